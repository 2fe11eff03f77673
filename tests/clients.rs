//! Real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy, fio) against the real daemon.

use std::process::Command;

use thinbd_tests::{Server, pattern, require, run};

#[test]
fn qemu_img_convert_round_trip_256mib() {
    if !require("qemu-img") {
        return;
    }
    let s = Server::start();
    s.create_volume("img", "256MiB");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let back = dir.path().join("back.raw");
    let data = pattern(1, 256 << 20);
    std::fs::write(&src, &data).unwrap();
    run(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&src).arg(s.uri("img")));
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(s.uri("img")).arg(&back));
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "image read back differs from what was written");
    let v = s.volume_json("img");
    assert_eq!(v["allocated_bytes"], 256u64 << 20, "random data allocates every cluster");
}

#[test]
fn qemu_io_patterns_unaligned_fua_zero_discard() {
    if !require("qemu-io") {
        return;
    }
    let s = Server::start();
    s.create_volume("io", "64MiB");
    let uri = s.uri("io");
    let io = |cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        c.arg(&uri);
        let out = run(&mut c);
        assert!(!out.contains("Pattern verification failed"), "{cmds:?}: {out}");
        assert!(!out.to_lowercase().contains("error"), "{cmds:?}: {out}");
        out
    };
    // Aligned, unaligned within a cluster, and across cluster boundaries.
    io(&["write -P 0x11 0 64k", "read -P 0x11 0 64k"]);
    io(&["write -P 0x22 1000 3000", "read -P 0x22 1000 3000", "read -P 0x11 0 1000", "read -P 0x11 4000 1000"]);
    io(&["write -P 0x33 65000 200000", "read -P 0x33 65000 200000", "read -P 0 265000 10000"]);
    // FUA writes.
    io(&["write -f -P 0x44 1M 12345", "read -P 0x44 1M 12345"]);
    // Zeroing, with and without unmap, whole and partial clusters.
    io(&["write -P 0x55 2M 256k", "write -z 2M 128k", "read -P 0 2M 128k", "read -P 0x55 2176k 128k"]);
    io(&["write -z -u 2176k 100", "read -P 0 2176k 100", "read -P 0x55 2228324 100"]);
    // Discard, then it reads as zeros.
    io(&["write -P 0x66 4M 1M", "discard 4M 1M", "read -P 0 4M 1M"]);
    // Data survives reconnects: everything above is still there.
    io(&["read -P 0x11 0 1000", "read -P 0x33 65000 200000", "read -P 0x44 1M 12345"]);
}

fn nbdinfo_json(s: &Server, name: &str) -> serde_json::Value {
    let out = run(Command::new("nbdinfo").arg("--json").arg(s.uri(name)));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo --json: {e}: {out}"))
}

#[test]
fn nbdinfo_shows_size_flags_map_and_list() {
    if !require("nbdinfo") || !require("qemu-io") {
        return;
    }
    let s = Server::start();
    s.create_volume("alpha", "16MiB");
    s.create_volume("beta", "1GiB");
    let info = nbdinfo_json(&s, "alpha");
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], 16u64 << 20);
    for flag in ["can_trim", "can_zero", "can_fua", "can_multi_conn", "can_flush", "can_cache", "can_df"] {
        assert_eq!(export[flag], true, "{flag} in {export}");
    }
    assert_eq!(export["is_read_only"], false);
    assert_eq!(export["is_rotational"], false);

    // Write two clusters' worth, trim the first: the map shows data only where data is left.
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 128k", "-c", "write -P 2 1M 64k"])
        .arg(s.uri("alpha")));
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "discard 0 64k"]).arg(s.uri("alpha")));
    let map = run(Command::new("nbdinfo").args(["--map", "--json"]).arg(s.uri("alpha")));
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let extents: Vec<(u64, u64, bool)> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["type"].as_u64().unwrap() == 0))
        .collect();
    let data: Vec<(u64, u64)> = extents.iter().filter(|e| e.2).map(|e| (e.0, e.1)).collect();
    assert_eq!(data, vec![(64 << 10, 64 << 10), (1 << 20, 64 << 10)], "map: {extents:?}");
    assert_eq!(extents.iter().map(|e| e.1).sum::<u64>(), 16 << 20, "map covers the export");

    let list = run(Command::new("nbdinfo").args(["--list", "--json"]).arg(format!("nbd://{}", s.addr())));
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let mut names: Vec<&str> =
        list["exports"].as_array().unwrap().iter().map(|e| e["export-name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["alpha", "beta"]);
}

#[test]
fn nbdcopy_with_several_connections() {
    if !require("nbdcopy") {
        return;
    }
    let s = Server::start();
    s.create_volume("copy", "64MiB");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let back = dir.path().join("back.raw");
    let mut data = pattern(7, 64 << 20);
    // Leave a zero stretch so nbdcopy's sparse handling is exercised too.
    data[8 << 20..16 << 20].fill(0);
    std::fs::write(&src, &data).unwrap();
    run(Command::new("nbdcopy").args(["--connections=4", "--threads=4", "--requests=16"]).arg(&src).arg(s.uri("copy")));
    run(Command::new("nbdcopy").args(["--connections=4", "--threads=4"]).arg(s.uri("copy")).arg(&back));
    assert!(std::fs::read(&back).unwrap() == data, "nbdcopy round trip differs");
    let log = s.log_text();
    let sessions = log.matches("NBD session started").count();
    assert!(sessions >= 5, "expected 4 connections for the upload, {sessions} seen:\n{log}");
}

#[test]
fn fio_nbd_randwrite_verify() {
    if !require("fio") {
        return;
    }
    let s = Server::start();
    s.create_volume("fio", "128MiB");
    let out = run(Command::new("fio").args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", s.uri("fio")),
        "--rw=randwrite",
        "--bs=4k",
        "--size=128M",
        "--iodepth=32",
        "--verify=crc32c",
        "--verify_state_save=0",
        "--do_verify=1",
        "--verify_fatal=1",
        "--output-format=json",
    ]));
    let j: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let job = &j["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert_eq!(job["write"]["io_bytes"], 128u64 << 20);
    assert_eq!(job["read"]["io_bytes"], 128u64 << 20, "every block was read back and verified");
    // A second, read-only pass in a new connection verifies what is on the volume now.
    run(Command::new("fio").args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", s.uri("fio")),
        "--rw=randwrite",
        "--bs=4k",
        "--size=128M",
        "--iodepth=16",
        "--verify=crc32c",
        "--verify_state_save=0",
        "--verify_only",
        "--verify_fatal=1",
    ]));
    let m = s.metrics();
    assert!(m.contains("thinbd_volume_written_bytes_total{volume=\"fio\"} 134217728"), "{m}");
}
