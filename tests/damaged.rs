//! Damaged and mismatched data dirs: a missing, truncated or foreign pool file, a missing or
//! empty metadata file, and every page of a small `meta.redb` zeroed or bit-flipped. `serve` and
//! `fsck` must refuse with an error (never a panic), and a daemon that does start must serve
//! exactly the data that was written.

use std::path::Path;
use std::process::Command;

use thinbd_protocol::client::{Client, ClientOptions};
use thinbd_tests::{Server, pattern, runtime, thinbd_bin};

const PAGE: usize = 4096;

/// What the template data dir holds: volume `v` (1 MiB of pattern 1, then pattern 2 over its
/// first 256 KiB after snapshot `s`), snapshot `v@s` and clone `c` of it.
fn expected() -> Vec<(&'static str, Vec<u8>)> {
    let base = pattern(1, 1 << 20);
    let mut now = base.clone();
    now[..256 << 10].copy_from_slice(&pattern(2, 256 << 10));
    vec![("v", now), ("v@s", base.clone()), ("c", base)]
}

fn make_template() -> Server {
    let mut s = Server::start_with(&["--capacity", "64MiB"]);
    s.create_volume("v", "4MiB");
    runtime().block_on(async {
        let c = Client::connect(s.addr(), ClientOptions::new("v")).await.unwrap();
        c.write(0, &pattern(1, 1 << 20), 0).await.unwrap();
        c.flush().await.unwrap();
        c.disconnect().await.unwrap();
    });
    s.cli(&["snapshot", "create", "v", "s"]);
    s.cli(&["volume", "clone", "v@s", "c"]);
    runtime().block_on(async {
        let c = Client::connect(s.addr(), ClientOptions::new("v")).await.unwrap();
        c.write(0, &pattern(2, 256 << 10), 0).await.unwrap();
        c.flush().await.unwrap();
        c.disconnect().await.unwrap();
    });
    assert!(s.stop().success());
    s
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["meta.redb", "pool.img"] {
        if from.join(f).exists() {
            std::fs::copy(from.join(f), to.join(f)).unwrap();
        }
    }
}

fn fsck(dir: &Path) -> (i32, String) {
    let out = Command::new(thinbd_bin()).args(["fsck", "--data-dir"]).arg(dir).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// Starts a daemon on `dir`: `Ok` with it running, or `Err` with why it refused.
fn serve(dir: &Path) -> Result<Server, String> {
    let mut s = Server::unstarted(&[], "info");
    s.data_dir = dir.to_path_buf();
    s.try_spawn().map(|()| s)
}

fn assert_refused(what: &str, dir: &Path, reason: &str) {
    let err = serve(dir).err().unwrap_or_else(|| panic!("{what}: serve started"));
    assert!(err.contains("exit status: 1") && err.contains(reason), "{what}: {err}");
    let (code, text) = fsck(dir);
    assert_eq!(code, 1, "{what}: fsck said\n{text}");
}

fn reads_back(s: &Server) -> Result<(), String> {
    runtime().block_on(async {
        for (export, want) in expected() {
            let c =
                Client::connect(s.addr(), ClientOptions::new(export)).await.map_err(|e| format!("{export}: {e}"))?;
            let got = c.read(0, want.len() as u32).await.map_err(|e| format!("{export}: {e}"))?;
            if got != want {
                return Err(format!("{export} reads different data"));
            }
            let _ = c.disconnect().await;
        }
        Ok(())
    })
}

#[test]
fn missing_truncated_or_foreign_files_are_refused() {
    let t = make_template();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("d");
    let fresh = |dir: &Path| {
        let _ = std::fs::remove_dir_all(dir);
        copy_dir(&t.data_dir, dir);
    };

    fresh(&dir);
    std::fs::remove_file(dir.join("pool.img")).unwrap();
    assert_refused("pool deleted", &dir, "pool file");
    assert!(!dir.join("pool.img").exists(), "a refused start must not create an empty pool");

    fresh(&dir);
    std::fs::OpenOptions::new().write(true).open(dir.join("pool.img")).unwrap().set_len(1 << 20).unwrap();
    assert_refused("pool truncated", &dir, "shorter than");

    fresh(&dir);
    std::fs::remove_file(dir.join("meta.redb")).unwrap();
    assert_refused("metadata deleted", &dir, "metadata file");

    fresh(&dir);
    std::fs::write(dir.join("meta.redb"), b"").unwrap();
    assert_refused("metadata emptied", &dir, "metadata file");

    // Another pool's file beside this metadata.
    let mut other = Server::start_with(&["--capacity", "64MiB"]);
    other.create_volume("x", "1MiB");
    other.stop();
    fresh(&dir);
    std::fs::copy(other.data_dir.join("pool.img"), dir.join("pool.img")).unwrap();
    assert_refused("foreign pool", &dir, "different pools");

    // The untouched copy serves everything.
    fresh(&dir);
    let (code, text) = fsck(&dir);
    assert_eq!(code, 0, "{text}");
    let mut s = serve(&dir).expect("intact copy starts");
    reads_back(&s).unwrap();
    s.stop();
}

#[test]
fn every_damaged_metadata_page_is_an_error_or_harmless() {
    let t = make_template();
    let meta = std::fs::read(t.data_dir.join("meta.redb")).unwrap();
    let pages: Vec<usize> =
        (0..meta.len() / PAGE).filter(|p| meta[p * PAGE..][..PAGE].iter().any(|b| *b != 0)).collect();
    assert!(!pages.is_empty());
    eprintln!("meta.redb: {} bytes, {} pages hold data", meta.len(), pages.len());
    let work = tempfile::tempdir().unwrap();
    let (mut refused, mut served) = (0, 0);
    for &page in &pages {
        for damage in ["zero", "flip0", "flip1", "flip2", "flip3"] {
            let dir = work.path().join(format!("p{page}-{damage}"));
            copy_dir(&t.data_dir, &dir);
            let mut bytes = meta.clone();
            let at = page * PAGE;
            match damage.strip_prefix("flip").and_then(|k| k.parse::<usize>().ok()) {
                None => bytes[at..at + PAGE].fill(0),
                // One bit, at a different place of the page for each variant.
                Some(k) => bytes[at + (k * 1021 + page * 7 + 17) % PAGE] ^= 1 << ((k + page) % 8),
            }
            std::fs::write(dir.join("meta.redb"), &bytes).unwrap();
            let what = format!("page {page} ({damage})");
            let (code, text) = fsck(&dir);
            assert!(code == 0 || code == 1, "{what}: fsck exited {code}:\n{text}");
            assert!(!text.contains("panicked"), "{what}: fsck panicked:\n{text}");
            match serve(&dir) {
                Err(e) => {
                    assert!(e.contains("exit status: 1") && !e.contains("panicked"), "{what}: {e}");
                    refused += 1;
                }
                Ok(mut s) => {
                    // It started, so its own check passed: it must serve what was written.
                    if let Err(e) = reads_back(&s) {
                        panic!("{what}: serve started on damaged metadata and {e}\nfsck: {text}");
                    }
                    s.kill9();
                    served += 1;
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    eprintln!("{} damaged copies: {refused} refused, {served} served correctly", refused + served);
}
