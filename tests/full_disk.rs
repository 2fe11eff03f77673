//! The data dir's filesystem fills up under a writing client and is then grown, with the daemon
//! running: clients hear ENOSPC (not EIO), the metadata store recovers without a restart once
//! there is space, and every write acknowledged by a FLUSH reads back, before and after a
//! restart. The filesystem is a size-limited tmpfs (root only: mount).

use std::path::{Path, PathBuf};
use std::process::Command;

use thinbd_protocol::client::{Client, ClientOptions};
use thinbd_tests::{Server, pattern, runtime};

const MIB: u64 = 1 << 20;

/// A tmpfs of `size` at `dir`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }

    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remounting {} with size {size} failed", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn verify(s: &Server, chunks: &[u64]) {
    runtime().block_on(async {
        let c = Client::connect(s.addr(), ClientOptions::new("vol")).await.unwrap();
        for &i in chunks {
            let got = c.read(i * MIB, MIB as u32).await.unwrap();
            assert!(got == pattern(i, MIB as usize), "acknowledged chunk {i} reads back different data");
        }
        c.disconnect().await.unwrap();
    });
}

#[test]
fn a_full_data_dir_answers_enospc_and_recovers_when_grown() {
    let work = tempfile::tempdir().unwrap();
    let mnt = work.path().join("mnt");
    let Some(fs) = Tmpfs::mount(&mnt, "24m") else {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI runs as root and must be able to mount a tmpfs");
        eprintln!("SKIPPED: cannot mount a tmpfs (not root?)");
        return;
    };
    let mut s = Server::unstarted(&["--capacity", "256MiB"], "info");
    s.data_dir = mnt.join("data");
    s.spawn();
    s.create_volume("vol", "200MiB");

    // Write 1 MiB chunks, each followed by a FLUSH, until the filesystem is full.
    let mut acked = Vec::new();
    let mut errnos = Vec::new();
    runtime().block_on(async {
        let c = Client::connect(s.addr(), ClientOptions::new("vol")).await.unwrap();
        for i in 0..100u64 {
            let r = async {
                c.write(i * MIB, &pattern(i, MIB as usize), 0).await?;
                c.flush().await
            }
            .await;
            match r {
                Ok(()) if errnos.is_empty() => acked.push(i),
                Ok(()) => {}
                Err(e) => errnos.push(e.errno()),
            }
            if errnos.len() >= 4 {
                break;
            }
        }
        let _ = c.disconnect().await;
    });
    assert!(!acked.is_empty() && acked.len() < 24, "{} chunks fit in a 24 MiB filesystem?", acked.len());
    assert!(errnos.iter().all(|e| *e == Some(28)), "a full disk must answer ENOSPC, got {errnos:?}");
    // Reads go on while the disk is full.
    verify(&s, &acked);
    // A TRIM commits without syncing: the store may lose it when it is reopened, the engine not.
    let trimmed = acked.remove(0);
    runtime().block_on(async {
        let c = Client::connect(s.addr(), ClientOptions::new("vol")).await.unwrap();
        c.trim(trimmed * MIB, MIB as u32).await.unwrap();
        c.disconnect().await.unwrap();
    });
    // Fill what the pool left, then change metadata until the store's own writes fail.
    let _ = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", mnt.join("filler").display()))
        .arg("bs=64k")
        .output();
    let mut refused = None;
    for n in 0..500 {
        let out = s.cli_output(&["snapshot", "create", "vol", &format!("s{n}")]);
        if !out.status.success() {
            refused = Some(String::from_utf8_lossy(&out.stderr).into_owned());
            break;
        }
    }
    let refused = refused.expect("500 snapshots fit in a full filesystem?");
    assert!(refused.contains("metadata store"), "{refused}");
    // Not ready while the store is failed (unless it already got back on its feet).
    let ready = s.http_get("/readyz");
    if !s.log_text().contains("metadata store recovered") {
        assert!(ready.starts_with("HTTP/1.0 503") && ready.contains("metadata store"), "{ready}");
    }
    runtime().block_on(async {
        let c = Client::connect(s.addr(), ClientOptions::new("vol")).await.unwrap();
        // Either the store could already be reopened in what space the failed commit left, or
        // the client hears ENOSPC; never EIO.
        if let Err(e) = c.flush().await {
            assert_eq!(e.errno(), Some(28), "FLUSH on a full metadata store: {e}");
        }
        c.disconnect().await.unwrap();
    });
    verify(&s, &acked);
    std::fs::remove_file(mnt.join("filler")).unwrap();

    // More space, same daemon: FLUSH, first writes, snapshots and new volumes work again.
    fs.resize("512m");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let more: Vec<u64> = (acked.len() as u64..acked.len() as u64 + 30).collect();
    runtime().block_on(async {
        let c = Client::connect(s.addr(), ClientOptions::new("vol")).await.unwrap();
        let mut flushed = false;
        for _ in 0..30 {
            if c.flush().await.is_ok() {
                flushed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        assert!(flushed, "FLUSH still fails after the filesystem grew:\n{}", s.log_text());
        for &i in &more {
            c.write(i * MIB, &pattern(i, MIB as usize), 0).await.unwrap();
        }
        c.flush().await.unwrap();
        c.disconnect().await.unwrap();
    });
    s.cli(&["snapshot", "create", "vol", "after"]);
    s.create_volume("new", "1MiB");
    assert!(s.http_get("/readyz").starts_with("HTTP/1.0 200"), "ready again once the store recovered");
    let log = s.log_text();
    assert!(log.contains("metadata store I/O error"), "the metadata store never failed; the test did not fill it");
    assert!(log.contains("metadata store recovered"), "{log}");
    let all: Vec<u64> = acked.iter().chain(&more).copied().collect();
    verify(&s, &all);

    // A restart finds consistent metadata (the start-up check passes) and the same data.
    assert!(s.stop().success());
    s.spawn();
    verify(&s, &all);
    runtime().block_on(async {
        let c = Client::connect(s.addr(), ClientOptions::new("vol")).await.unwrap();
        assert!(c.read(trimmed * MIB, MIB as u32).await.unwrap().iter().all(|b| *b == 0), "the TRIM was lost");
        c.disconnect().await.unwrap();
    });
    assert!(s.stop().success());
    drop(fs);
}
