//! Snapshots and clones through the binary: CLI, read-only snapshot exports seen by real clients,
//! kill -9 under fio load, and `thinbd fsck` on the data dir afterwards.

use std::process::Command;
use std::time::Duration;

use thinbd_tests::{Server, require, run, thinbd_bin};

fn fsck(s: &Server) -> std::process::Output {
    Command::new(thinbd_bin()).args(["fsck", "--data-dir"]).arg(&s.data_dir).output().unwrap()
}

#[test]
fn snapshot_clone_restore_with_real_clients() {
    if !require("qemu-io") || !require("nbdinfo") {
        return;
    }
    let mut s = Server::start();
    s.create_volume("db", "64MiB");
    let qio = |uri: String, cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        if uri.contains('@') {
            c.arg("-r");
        }
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        c.arg(uri).output().unwrap()
    };
    let ok = |o: std::process::Output| {
        let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success() && !out.contains("verification failed") && !out.contains("error"), "{out}");
    };
    ok(qio(s.uri("db"), &["write -P 0x11 0 4M"]));
    let snap: serde_json::Value =
        serde_json::from_str(&s.cli(&["snapshot", "create", "db", "monday", "-o", "json"])).unwrap();
    assert_eq!(snap[0]["snapshot"], "db@monday");
    ok(qio(s.uri("db"), &["write -P 0x22 1M 1M"]));
    // The snapshot export is read-only and still shows Monday's data.
    let info: serde_json::Value =
        serde_json::from_str(&run(Command::new("nbdinfo").arg("--json").arg(s.uri("db@monday")))).unwrap();
    assert_eq!(info["exports"][0]["is_read_only"], true);
    ok(qio(s.uri("db@monday"), &["read -P 0x11 0 4M"]));
    let w = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x33 0 4k"])
        .arg(s.uri("db@monday"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&w.stdout).to_string() + &String::from_utf8_lossy(&w.stderr);
    assert!(
        !w.status.success() && text.contains("Permission denied"),
        "a writable open of a snapshot must fail: {text}"
    );
    ok(qio(s.uri("db@monday"), &["read -P 0x11 0 4k"]));
    // Restore = clone from the snapshot; clone from the live volume too.
    s.cli(&["volume", "clone", "db@monday", "restored"]);
    s.cli(&["volume", "clone", "db", "copy"]);
    ok(qio(s.uri("restored"), &["read -P 0x11 0 4M", "write -P 0x44 0 64k"]));
    ok(qio(s.uri("copy"), &["read -P 0x11 0 1M", "read -P 0x22 1M 1M", "read -P 0x11 2M 2M"]));
    ok(qio(s.uri("db@monday"), &["read -P 0x11 0 4M"]));
    // Accounting: db owns the 1 MiB it rewrote, shares the rest with its snapshot.
    let v = s.volume_json("db");
    assert_eq!(v["allocated_bytes"], 4u64 << 20);
    let list: serde_json::Value = serde_json::from_str(&s.cli(&["snapshot", "list", "db", "-o", "json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    // Deletes in any order; every cluster comes back.
    s.cli(&["volume", "delete", "db"]);
    ok(qio(s.uri("restored"), &["read -P 0x44 0 64k", "read -P 0x11 64k 1M"]));
    s.cli(&["snapshot", "delete", "db@monday"]);
    ok(qio(s.uri("restored"), &["read -P 0x11 64k 1M"]));
    s.cli(&["volume", "delete", "restored"]);
    s.cli(&["volume", "delete", "copy"]);
    let pool: serde_json::Value = serde_json::from_str(&s.cli(&["pool", "-o", "json"])).unwrap();
    assert_eq!(pool["used_bytes"], 0);
    let m = s.metrics();
    assert!(m.contains("thinbd_pool_used_bytes 0"), "{m}");
    assert!(s.stop().success());
    let f = fsck(&s);
    assert!(f.status.success(), "{}", String::from_utf8_lossy(&f.stdout));
    assert!(String::from_utf8_lossy(&f.stdout).contains("OK"));
}

#[test]
fn kill_9_under_fio_load_keeps_flushed_data_and_fsck_passes() {
    if !require("fio") {
        return;
    }
    let mut s = Server::start();
    s.create_volume("load", "256MiB");
    let uri = s.uri("load");
    let fio = |extra: &[&str]| {
        let mut c = Command::new("fio");
        c.args(["--name=load", "--ioengine=nbd", &format!("--uri={uri}"), "--bs=4k", "--iodepth=16"]);
        c.args(extra);
        c
    };
    // The first half: written, verified-pattern, flushed at the end.
    run(&mut fio(&[
        "--rw=randwrite",
        "--offset=0",
        "--size=64M",
        "--verify=crc32c",
        "--verify_state_save=0",
        "--do_verify=0",
        "--end_fsync=1",
    ]));
    s.cli(&["snapshot", "create", "load", "before"]);
    // The second half under heavy random writes with flushes, killed halfway.
    let mut load =
        fio(&["--rw=randwrite", "--offset=128M", "--size=128M", "--time_based", "--runtime=30", "--fsync=64"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    s.kill9();
    let _ = load.wait();
    let f = fsck(&s);
    assert!(f.status.success(), "fsck after kill -9: {}", String::from_utf8_lossy(&f.stdout));
    s.spawn();
    // Flushed data is intact, in the volume and in the snapshot.
    for uri in [s.uri("load"), s.uri("load@before")] {
        let mut c = Command::new("fio");
        c.args(["--name=load", "--ioengine=nbd", &format!("--uri={uri}"), "--bs=4k", "--iodepth=16"]);
        c.args([
            "--rw=randwrite",
            "--offset=0",
            "--size=64M",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--verify_only",
            "--verify_fatal=1",
        ]);
        run(&mut c);
    }
    // And the rest reads without errors.
    run(&mut fio(&["--rw=read", "--offset=128M", "--size=128M", "--bs=1M"]));
}

#[test]
fn writes_to_a_snapshot_export_get_eperm() {
    use thinbd_protocol::client::{Client, ClientOptions};
    use thinbd_protocol::consts::{EPERM, FLAG_READ_ONLY};
    let s = Server::start();
    s.create_volume("ro", "1MiB");
    s.cli(&["snapshot", "create", "ro", "s"]);
    thinbd_tests::runtime().block_on(async {
        let c = Client::connect(s.addr(), ClientOptions::new("ro@s")).await.unwrap();
        assert_ne!(c.flags & FLAG_READ_ONLY, 0);
        assert_eq!(c.write(0, b"nope", 0).await.err().and_then(|e| e.errno()), Some(EPERM));
        assert_eq!(c.trim(0, 4096).await.err().and_then(|e| e.errno()), Some(EPERM));
        assert_eq!(c.read(0, 4).await.unwrap(), vec![0; 4]);
        // Deleting a snapshot with an open session is refused.
        let o = s.cli_output(&["snapshot", "delete", "ro@s"]);
        assert!(String::from_utf8_lossy(&o.stderr).contains("open NBD session"));
    });
}
