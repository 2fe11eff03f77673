//! StorageClass parameters. Keys under `csi.storage.k8s.io/` belong to the CO and are ignored,
//! as the CSI spec asks; anything else must be one of ours.

use std::collections::HashMap;

/// Parameters thinbd understands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    /// Extra `mkfs` arguments for filesystem volumes, e.g. `-E nodiscard`.
    pub mkfs_options: Option<String>,
}

pub const KNOWN: &[&str] = &["mkfsOptions"];

pub fn parse(raw: &HashMap<String, String>) -> Result<Params, String> {
    let mut p = Params::default();
    let mut keys: Vec<&String> = raw.keys().collect();
    keys.sort();
    for k in keys {
        let v = &raw[k];
        if k.starts_with("csi.storage.k8s.io/") {
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
            _ => return Err(format!("unknown StorageClass parameter {k:?} (thinbd knows: {})", KNOWN.join(", "))),
        }
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
    }
}
