//! Export names, parsed once at the NBD edge: `VOLUME`, `VOLUME@SNAPSHOT` (read-only) or a
//! grant's `VOLUME#TOKEN`.

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
    },
}

impl ExportName {
    /// `None` for names that cannot name anything (empty parts, both `@` and `#`).
    pub fn parse(name: &str) -> Option<ExportName> {
        let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        if let Some((volume, token)) = name.split_once('#') {
            if volume.contains('@') {
                return None;
            }
            return Some(ExportName::Grant { volume: nonempty(volume)?, token: nonempty(token)? });
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
            ExportName::Volume(v) | ExportName::Grant { volume: v, .. } => v.clone(),
            ExportName::Snapshot { volume, snapshot } => format!("{volume}@{snapshot}"),
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
        assert_eq!(g, ExportName::Grant { volume: "v".into(), token: "0123abcd".into() });
        assert_eq!(g.loggable(), "v");
        for bad in ["", "@s", "v@", "#t", "v#", "v@s#t"] {
            assert_eq!(ExportName::parse(bad), None, "{bad:?}");
        }
    }
}
