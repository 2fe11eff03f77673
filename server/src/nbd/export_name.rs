//! Export names, parsed once at the NBD edge: `VOLUME`, `VOLUME@SNAPSHOT` (read-only), a
//! grant's `VOLUME#TOKEN`, or, on the link from a volume's target to the node holding it,
//! `VOLUME#TOKEN;epoch=N`: the target's epoch, which the holder checks against the highest it
//! promised. A target reads a layer of a copy (a snapshot or a mark, read-only: the source of
//! a rebuild) as `VOLUME@SNAPSHOT#TOKEN;epoch=N`.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportName {
    Volume(String),
    Snapshot {
        volume: String,
        snapshot: String,
    },
    /// The token is the grant's secret: it never goes into a log line (see [`Self::loggable`]).
    Grant {
        volume: String,
        token: String,
        /// Set by a target forwarding to the holder.
        epoch: Option<u64>,
        /// A layer of the holder's copy, read-only (only on a target's link).
        snapshot: Option<String>,
    },
}

const EPOCH_SUFFIX: &str = ";epoch=";

/// The export name a target opens on the holder: the grant's name and the target's epoch.
pub fn with_epoch(grant_export: &str, epoch: u64) -> String {
    format!("{grant_export}{EPOCH_SUFFIX}{epoch}")
}

/// The export name of a layer of the holder's copy, from the target's link export name
/// ([`with_epoch`]).
pub fn layer_of(link_export: &str, snapshot: &str) -> String {
    match link_export.split_once('#') {
        Some((volume, rest)) => format!("{volume}@{snapshot}#{rest}"),
        None => format!("{link_export}@{snapshot}"),
    }
}

impl ExportName {
    /// `None` for names that cannot name anything (empty parts, both `@` and `#`).
    pub fn parse(name: &str) -> Option<ExportName> {
        let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        if let Some((volume, token)) = name.split_once('#') {
            let (token, epoch) = match token.split_once(EPOCH_SUFFIX) {
                Some((token, epoch)) if !epoch.starts_with('+') => (token, Some(epoch.parse().ok()?)),
                Some(_) => return None,
                None => (token, None),
            };
            let (volume, snapshot) = match volume.split_once('@') {
                // Layers are read on a target's link only.
                Some((volume, snapshot)) if epoch.is_some() => (volume, Some(nonempty(snapshot)?)),
                Some(_) => return None,
                None => (volume, None),
            };
            return Some(ExportName::Grant { volume: nonempty(volume)?, token: nonempty(token)?, epoch, snapshot });
        }
        match name.split_once('@') {
            Some((volume, snapshot)) => {
                Some(ExportName::Snapshot { volume: nonempty(volume)?, snapshot: nonempty(snapshot)? })
            }
            None => Some(ExportName::Volume(nonempty(name)?)),
        }
    }

    /// What a log line may say: the volume or snapshot, never a token.
    pub fn loggable(&self) -> String {
        match self {
            ExportName::Volume(v) | ExportName::Grant { volume: v, snapshot: None, .. } => v.clone(),
            ExportName::Snapshot { volume, snapshot } | ExportName::Grant { volume, snapshot: Some(snapshot), .. } => {
                format!("{volume}@{snapshot}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms_and_hides_tokens() {
        assert_eq!(ExportName::parse("v"), Some(ExportName::Volume("v".into())));
        assert_eq!(ExportName::parse("v@s"), Some(ExportName::Snapshot { volume: "v".into(), snapshot: "s".into() }));
        let g = ExportName::parse("v#0123abcd").unwrap();
        assert_eq!(g, ExportName::Grant { volume: "v".into(), token: "0123abcd".into(), epoch: None, snapshot: None });
        assert_eq!(g.loggable(), "v");
        let e = ExportName::parse(&with_epoch("v#0123abcd", 7)).unwrap();
        let link = ExportName::Grant { volume: "v".into(), token: "0123abcd".into(), epoch: Some(7), snapshot: None };
        assert_eq!(e, link);
        assert_eq!(e.loggable(), "v");
        let layer = ExportName::parse(&layer_of(&with_epoch("v#0123abcd", 7), ".m")).unwrap();
        let want = ExportName::Grant {
            volume: "v".into(),
            token: "0123abcd".into(),
            epoch: Some(7),
            snapshot: Some(".m".into()),
        };
        assert_eq!(layer, want);
        assert_eq!(layer.loggable(), "v@.m");
        for bad in [
            "",
            "@s",
            "v@",
            "#t",
            "v#",
            "v@s#t",
            "v@#t;epoch=1",
            "@s#t;epoch=1",
            "v#t;epoch=",
            "v#t;epoch=x",
            "v#t;epoch=+1",
            "v#;epoch=1",
        ] {
            assert_eq!(ExportName::parse(bad), None, "{bad:?}");
        }
    }
}
