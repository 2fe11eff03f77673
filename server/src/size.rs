//! Human sizes on the command line: `512MiB`, `10Gi` (as Kubernetes writes them), `1T`,
//! plain bytes.

/// Parses a size. Binary units (KiB, MiB, GiB, TiB) and their short forms (Ki, Mi, Gi, Ti as in
/// Kubernetes quantities; K, M, G, T) are
/// powers of 1024; KB/MB/GB/TB are powers of 1000, as people usually mean on the command line.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(format!("{s:?} is not a size (try 1GiB, 512MiB or a number of bytes)"));
    }
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        "t" | "ti" | "tib" => 1 << 40,
        "p" | "pi" | "pib" => 1 << 50,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => return Err(format!("unknown size unit {other:?} in {s:?} (use KiB, MiB, GiB, TiB)")),
    };
    let value = if num.contains('.') {
        let f: f64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
        let v = f * mult as f64;
        if !v.is_finite() || v > u64::MAX as f64 {
            return Err(format!("{s:?} is too large"));
        }
        v.round() as u64
    } else {
        let n: u64 = num.parse().map_err(|_| format!("{s:?} is too large"))?;
        n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))?
    };
    Ok(value)
}

/// Formats bytes the way `parse_size` reads them back, e.g. `1.5 GiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("20Gi"), Ok(20 << 30));
        assert_eq!(parse_size("512Mi"), Ok(512 << 20));
        assert_eq!(parse_size("4Ki"), Ok(4096));
        assert_eq!(parse_size("1Ti"), Ok(1 << 40));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("2TB"), Ok(2_000_000_000_000));
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("16000000PiB").is_err());
    }

    #[test]
    fn formats_round_trip() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(parse_size(&format_size(10 << 30).replace(' ', "")), Ok(10 << 30));
    }
}
