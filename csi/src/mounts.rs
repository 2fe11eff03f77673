//! Filesystems and mounts on the node: what is mounted where, format-once, mount, bind mounts,
//! unmount and growing a filesystem. mkfs, blkid and the grow tools run as programs (with
//! arguments, never through a shell); mounts are syscalls.

use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{MntFlags, MsFlags, mount, umount2};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{what}: {source}")]
    Sys { what: String, source: nix::Error },
    #[error("{program}: {message}")]
    Tool { program: String, message: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// One line of /proc/self/mountinfo, unescaped.
struct Mount {
    root: String,
    mountpoint: PathBuf,
    fstype: String,
    source: String,
}

/// The mount table, in mount order. Fields: id parent major:minor root mountpoint options ...
/// - fstype source superopts.
fn mount_table() -> Vec<Mount> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let dash = f.iter().position(|x| *x == "-")?;
            Some(Mount {
                root: unescape(f.get(3)?),
                mountpoint: PathBuf::from(unescape(f.get(4)?)),
                fstype: f.get(dash + 1)?.to_string(),
                source: unescape(f.get(dash + 2)?),
            })
        })
        .collect()
}

/// The topmost mount at `target`, if it is a mount point.
fn mount_at(target: &Path) -> Option<Mount> {
    let target = target.canonicalize().ok()?;
    mount_table().into_iter().rev().find(|m| m.mountpoint == target)
}

/// The source device (or bind source root) mounted at `target`, if `target` is a mount point.
pub fn mounted_at(target: &Path) -> Option<String> {
    mount_at(target).map(|m| m.source)
}

/// The filesystem type mounted at `target`.
pub fn fstype_at(target: &Path) -> Option<String> {
    mount_at(target).map(|m| m.fstype)
}

/// Every mount point showing `dev`: mounts of its filesystem (source is the device) and bind
/// mounts of the device node itself (a devtmpfs mount whose root is `/nbdN`).
pub fn mountpoints_of(dev: &Path) -> Vec<PathBuf> {
    let dev_s = dev.to_string_lossy();
    let node_root = format!("/{}", dev.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    mount_table()
        .into_iter()
        .filter(|m| m.source == dev_s || (m.fstype == "devtmpfs" && m.root == node_root))
        .map(|m| m.mountpoint)
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn run(program: &str, args: &[&str]) -> Result<std::process::Output, MountError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| MountError::Tool { program: program.into(), message: e.to_string() })?;
    Ok(out)
}

/// The filesystem (or other signature) on `dev`, or None for a blank device.
pub fn signature(dev: &Path) -> Result<Option<String>, MountError> {
    let d = dev.to_string_lossy();
    let out = run("blkid", &["-p", "-o", "value", "-s", "TYPE", &d])?;
    match out.status.code() {
        Some(0) => {
            let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
            // A partition table or other non-filesystem signature has no TYPE but is not blank.
            Ok(Some(if t.is_empty() { "unknown".into() } else { t }))
        }
        // blkid exits 2 when it finds nothing.
        Some(2) => Ok(None),
        _ => Err(MountError::Tool { program: "blkid".into(), message: String::from_utf8_lossy(&out.stderr).into() }),
    }
}

/// Creates `fs` on `dev`. Callers check [`signature`] first: data is never reformatted.
pub fn mkfs(dev: &Path, fs: &str, extra: Option<&str>) -> Result<(), MountError> {
    let d = dev.to_string_lossy().into_owned();
    let mut args: Vec<String> = match fs {
        // No discard at mkfs: a fresh thin volume is already all holes.
        "ext4" => vec!["-q".into(), "-F".into(), "-E".into(), "nodiscard,lazy_itable_init=1".into()],
        "xfs" => vec!["-q".into(), "-K".into()],
        other => return Err(MountError::Tool { program: "mkfs".into(), message: format!("unsupported {other}") }),
    };
    if let Some(x) = extra {
        args.extend(x.split_whitespace().map(str::to_string));
    }
    args.push(d);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(&format!("mkfs.{fs}"), &refs)?;
    if !out.status.success() {
        return Err(MountError::Tool {
            program: format!("mkfs.{fs}"),
            message: String::from_utf8_lossy(&out.stderr).into(),
        });
    }
    Ok(())
}

pub fn mount_fs(dev: &Path, target: &Path, fs: &str, flags: &[String], read_only: bool) -> Result<(), MountError> {
    let mut ms = MsFlags::empty();
    let mut data = Vec::new();
    for f in flags.iter().flat_map(|f| f.split(',')) {
        match f {
            "ro" => ms |= MsFlags::MS_RDONLY,
            "noatime" => ms |= MsFlags::MS_NOATIME,
            "nodiratime" => ms |= MsFlags::MS_NODIRATIME,
            "nodev" => ms |= MsFlags::MS_NODEV,
            "nosuid" => ms |= MsFlags::MS_NOSUID,
            "noexec" => ms |= MsFlags::MS_NOEXEC,
            "sync" => ms |= MsFlags::MS_SYNCHRONOUS,
            "" | "rw" | "defaults" => {}
            other => data.push(other.to_string()),
        }
    }
    if read_only {
        ms |= MsFlags::MS_RDONLY;
    }
    // Snapshots and clones carry their source's filesystem UUID, and xfs refuses to mount a
    // second filesystem with a UUID already mounted.
    if fs == "xfs" && !data.iter().any(|d| d == "nouuid") {
        data.push("nouuid".into());
    }
    let data = data.join(",");
    mount(Some(dev), target, Some(fs), ms, (!data.is_empty()).then_some(data.as_str()))
        .map_err(|source| MountError::Sys { what: format!("mount {} on {}", dev.display(), target.display()), source })
}

/// Bind-mounts `src` (a directory or a device node) on `target`, read-only if asked.
pub fn bind(src: &Path, target: &Path, read_only: bool) -> Result<(), MountError> {
    let what = || format!("bind {} on {}", src.display(), target.display());
    mount(Some(src), target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|source| MountError::Sys { what: what(), source })?;
    if read_only {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|source| MountError::Sys { what: what(), source })?;
    }
    Ok(())
}

/// Unmounts `target` if it is a mount point. EBUSY comes back as an error for the caller to
/// report as retryable.
pub fn unmount(target: &Path) -> Result<(), MountError> {
    if mounted_at(target).is_none() {
        return Ok(());
    }
    umount2(target, MntFlags::empty())
        .map_err(|source| MountError::Sys { what: format!("unmount {}", target.display()), source })
}

/// Grows the filesystem mounted at `mountpoint` on `dev` to the device's size.
pub fn grow(dev: &Path, mountpoint: &Path, fs: &str) -> Result<(), MountError> {
    let out = match fs {
        "xfs" => run("xfs_growfs", &[&mountpoint.to_string_lossy()])?,
        _ => run("resize2fs", &[&dev.to_string_lossy()])?,
    };
    if !out.status.success() {
        return Err(MountError::Tool {
            program: format!("grow {fs}"),
            message: String::from_utf8_lossy(&out.stderr).into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/x\134y"), r"/x\y");
        assert_eq!(unescape("plain"), "plain");
        assert!(mounted_at(Path::new("/")).is_some(), "/ is a mount point");
        assert!(mounted_at(Path::new("/nonexistent-dir")).is_none());
    }
}
