//! StorageClass parameters. Keys under `csi.storage.k8s.io/` belong to the CO and are ignored,
//! as the CSI spec asks; anything else must be one of ours.

use std::collections::HashMap;

use thinbd_api::pb;

/// Parameters thinbd understands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    /// Extra `mkfs` arguments for filesystem volumes, e.g. `-E nodiscard`.
    pub mkfs_options: Option<String>,
    /// QoS limits (0: unlimited).
    pub qos: pb::Qos,
    /// In a cluster: copies on this many nodes (0: 3, or one per node up when fewer), and how
    /// many must stay in sync for writes to be acknowledged (0: replicas - 1).
    pub replicas: u32,
    pub min_insync: u32,
}

/// QoS keys: in StorageClass parameters, and in VolumeAttributesClass parameters (mutable:
/// ControllerModifyVolume changes them on a live volume).
pub const QOS_KEYS: &[&str] =
    &["maxIops", "maxReadIops", "maxWriteIops", "maxBandwidth", "maxReadBandwidth", "maxWriteBandwidth", "qosBurstMs"];

pub const KNOWN: &[&str] = &[
    "mkfsOptions",
    "replicas",
    "minInsync",
    "maxIops",
    "maxReadIops",
    "maxWriteIops",
    "maxBandwidth",
    "maxReadBandwidth",
    "maxWriteBandwidth",
    "qosBurstMs",
];

/// A count or a byte rate: digits, optionally with a binary suffix (`100Mi`, `100MiB`, `1G`).
fn number(key: &str, v: &str) -> Result<u64, String> {
    let v = v.trim();
    let digits = v.chars().take_while(|c| c.is_ascii_digit()).count();
    let (n, unit) = v.split_at(digits);
    let n: u64 = n.parse().map_err(|_| format!("{key} {v:?} is not a number"))?;
    let shift = match unit.trim_end_matches('B').trim_end_matches('i') {
        "" => 0,
        "K" | "k" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("{key} {v:?}: unknown unit {unit:?} (use Ki, Mi, Gi or Ti)")),
    };
    n.checked_mul(1 << shift).ok_or_else(|| format!("{key} {v:?} is too large"))
}

/// Sets the QoS field `key` names; false if `key` is not a QoS key.
fn set_qos(q: &mut pb::Qos, key: &str, v: &str) -> Result<bool, String> {
    let field = match key {
        "maxIops" => &mut q.iops,
        "maxReadIops" => &mut q.read_iops,
        "maxWriteIops" => &mut q.write_iops,
        "maxBandwidth" => &mut q.bandwidth,
        "maxReadBandwidth" => &mut q.read_bandwidth,
        "maxWriteBandwidth" => &mut q.write_bandwidth,
        "qosBurstMs" => &mut q.burst_ms,
        _ => return Ok(false),
    };
    *field = number(key, v)?;
    Ok(true)
}

/// Mutable parameters over `qos`: only QoS keys; anything else is an error.
pub fn apply_mutable(qos: &mut pb::Qos, raw: &HashMap<String, String>) -> Result<(), String> {
    let mut keys: Vec<&String> = raw.keys().collect();
    keys.sort();
    for k in keys {
        if !set_qos(qos, k, &raw[k])? {
            return Err(format!("unknown mutable parameter {k:?} (thinbd can change: {})", QOS_KEYS.join(", ")));
        }
    }
    Ok(())
}

pub fn parse(raw: &HashMap<String, String>) -> Result<Params, String> {
    let mut p = Params::default();
    let mut keys: Vec<&String> = raw.keys().collect();
    keys.sort();
    for k in keys {
        let v = &raw[k];
        if k.starts_with("csi.storage.k8s.io/") || set_qos(&mut p.qos, k, v)? {
            continue;
        }
        match k.as_str() {
            "mkfsOptions" => {
                // Passed to mkfs as separate arguments, never through a shell.
                if !v.chars().all(|c| c.is_ascii_alphanumeric() || " -_=,.:".contains(c)) {
                    return Err(format!("mkfsOptions {v:?} may only hold letters, digits, spaces and -_=,.:"));
                }
                p.mkfs_options = Some(v.trim().to_string()).filter(|s| !s.is_empty());
            }
            "replicas" | "minInsync" => {
                let n: u32 = v.trim().parse().map_err(|_| format!("{k} {v:?} is not a count"))?;
                if !(1..=16).contains(&n) {
                    return Err(format!("{k} {v:?}: from 1 to 16"));
                }
                *(if k == "replicas" { &mut p.replicas } else { &mut p.min_insync }) = n;
            }
            _ => return Err(format!("unknown StorageClass parameter {k:?} (thinbd knows: {})", KNOWN.join(", "))),
        }
    }
    if p.replicas > 0 && p.min_insync > p.replicas {
        return Err(format!("minInsync {} is more than replicas {}", p.min_insync, p.replicas));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters() {
        let m = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(parse(&m(&[])).unwrap(), Params::default());
        let p = parse(&m(&[("csi.storage.k8s.io/fstype", "xfs"), ("mkfsOptions", "-E nodiscard")])).unwrap();
        assert_eq!(p.mkfs_options.as_deref(), Some("-E nodiscard"));
        assert!(parse(&m(&[("pool", "x")])).unwrap_err().contains("unknown StorageClass parameter"));
        assert!(parse(&m(&[("mkfsOptions", "-O x; rm -rf /")])).is_err());
        let p = parse(&m(&[("maxIops", "2000"), ("maxWriteBandwidth", "100Mi")])).unwrap();
        assert_eq!((p.qos.iops, p.qos.write_bandwidth), (2000, 100 << 20));
        assert!(parse(&m(&[("maxIops", "lots")])).is_err());
        let r = parse(&m(&[("replicas", "3"), ("minInsync", "2")])).unwrap();
        assert_eq!((r.replicas, r.min_insync), (3, 2));
        assert!(parse(&m(&[("replicas", "2"), ("minInsync", "3")])).is_err());
        assert!(parse(&m(&[("replicas", "0")])).is_err() && parse(&m(&[("replicas", "three")])).is_err());
        let mut q = p.qos;
        apply_mutable(&mut q, &m(&[("maxIops", "500"), ("maxBandwidth", "1GiB")])).unwrap();
        assert_eq!((q.iops, q.bandwidth, q.write_bandwidth), (500, 1 << 30, 100 << 20));
        assert!(apply_mutable(&mut q, &m(&[("mkfsOptions", "-q")])).unwrap_err().contains("unknown mutable"));
    }
}
