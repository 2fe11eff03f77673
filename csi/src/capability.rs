//! Which volume capabilities thinbd supports, and what each asks of the storage server.
//!
//! Every access mode works with raw block; with a filesystem, modes that let two nodes write at
//! once are refused, since ext4 and xfs are not cluster filesystems.

use thinbd_api::csi::VolumeCapability;
use thinbd_api::csi::volume_capability::access_mode::Mode;
use thinbd_api::csi::volume_capability::{AccessMode, AccessType};

pub const FS_TYPES: &[&str] = &["ext4", "xfs"];
pub const DEFAULT_FS: &str = "ext4";

/// What a validated capability means for thinbd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub mode: Mode,
    /// `None`: raw block device.
    pub fs_type: Option<String>,
    pub mount_flags: Vec<String>,
}

impl Usage {
    pub fn read_only(&self) -> bool {
        matches!(self.mode, Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly)
    }

    /// No other node may write while this attachment lasts.
    pub fn single_writer(&self) -> bool {
        !matches!(self.mode, Mode::MultiNodeMultiWriter | Mode::MultiNodeReaderOnly | Mode::SingleNodeReaderOnly)
    }

    /// Only one publish (one workload) on the node may use it (ReadWriteOncePod).
    pub fn single_workload(&self) -> bool {
        self.mode == Mode::SingleNodeSingleWriter
    }
}

/// Checks one capability; the error says what is wrong in words a user can act on.
pub fn check(cap: &VolumeCapability) -> Result<Usage, String> {
    let mode = cap
        .access_mode
        .as_ref()
        .map(AccessMode::mode)
        .filter(|m| *m != Mode::Unknown)
        .ok_or("volume capability has no access mode")?;
    match &cap.access_type {
        None => Err("volume capability has neither block nor mount access type".into()),
        Some(AccessType::Block(_)) => Ok(Usage { mode, fs_type: None, mount_flags: Vec::new() }),
        Some(AccessType::Mount(m)) => {
            let fs = if m.fs_type.is_empty() { DEFAULT_FS.to_string() } else { m.fs_type.to_ascii_lowercase() };
            if !FS_TYPES.contains(&fs.as_str()) {
                return Err(format!(
                    "filesystem {:?} is not supported (use one of {})",
                    m.fs_type,
                    FS_TYPES.join(", ")
                ));
            }
            if matches!(mode, Mode::MultiNodeMultiWriter | Mode::MultiNodeSingleWriter) {
                return Err(format!(
                    "access mode {} needs raw block: {fs} cannot be mounted on several nodes",
                    mode.as_str_name()
                ));
            }
            if let Some(bad) = m.mount_flags.iter().find(|f| f.is_empty() || f.contains('\0')) {
                return Err(format!("invalid mount flag {bad:?}"));
            }
            Ok(Usage { mode, fs_type: Some(fs), mount_flags: m.mount_flags.clone() })
        }
    }
}

/// Checks a list that must not be empty.
pub fn check_all(caps: &[VolumeCapability]) -> Result<Vec<Usage>, String> {
    if caps.is_empty() {
        return Err("volume_capabilities is required".into());
    }
    caps.iter().map(check).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use thinbd_api::csi::volume_capability::{BlockVolume, MountVolume};

    fn cap(mode: Mode, access: Option<AccessType>) -> VolumeCapability {
        VolumeCapability { access_type: access, access_mode: Some(AccessMode { mode: mode as i32 }) }
    }

    fn mount(fs: &str) -> Option<AccessType> {
        Some(AccessType::Mount(MountVolume { fs_type: fs.into(), ..Default::default() }))
    }

    #[test]
    fn modes_and_types() {
        let block = Some(AccessType::Block(BlockVolume {}));
        for m in [Mode::SingleNodeWriter, Mode::MultiNodeMultiWriter, Mode::SingleNodeSingleWriter] {
            assert!(check(&cap(m, block.clone())).is_ok());
        }
        assert_eq!(check(&cap(Mode::SingleNodeWriter, mount(""))).unwrap().fs_type.as_deref(), Some("ext4"));
        assert_eq!(check(&cap(Mode::SingleNodeWriter, mount("XFS"))).unwrap().fs_type.as_deref(), Some("xfs"));
        assert!(check(&cap(Mode::SingleNodeWriter, mount("btrfs"))).unwrap_err().contains("not supported"));
        assert!(check(&cap(Mode::MultiNodeMultiWriter, mount("ext4"))).unwrap_err().contains("raw block"));
        assert!(check(&cap(Mode::Unknown, block.clone())).is_err());
        assert!(check(&cap(Mode::SingleNodeWriter, None)).is_err());
        assert!(check_all(&[]).is_err());
        let u = check(&cap(Mode::MultiNodeReaderOnly, mount("ext4"))).unwrap();
        assert!(u.read_only() && !u.single_writer());
        assert!(check(&cap(Mode::SingleNodeSingleWriter, block)).unwrap().single_workload());
    }
}
