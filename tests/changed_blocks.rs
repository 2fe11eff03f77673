//! Changed-block tracking through the real binary: `snapshot diff` / `snapshot allocated` give
//! exactly the clusters written or trimmed, the NBD meta context `thinbd:changed:SNAP` says the
//! same to nbdinfo, and an incremental backup (a full copy of A, then only the ranges changed
//! up to B) equals B byte for byte.

use std::process::Command;

use thinbd_protocol::client::{Client, ClientOptions};
use thinbd_tests::{Server, pattern, require, run, runtime};

const CS: u64 = 64 * 1024;

fn ranges(s: &Server, args: &[&str]) -> Vec<(u64, u64)> {
    let mut a = vec!["snapshot"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&s.cli(&a)).unwrap();
    v.as_array().unwrap().iter().map(|r| (r["offset"].as_u64().unwrap(), r["length"].as_u64().unwrap())).collect()
}

#[test]
fn diffs_are_exact_and_match_the_meta_context() {
    let s = Server::start();
    s.create_volume("v", "8MiB");
    let rt = runtime();
    let write = |off: u64, len: usize, seed: u64| {
        rt.block_on(async {
            let c = Client::connect(s.addr(), ClientOptions::new("v")).await.unwrap();
            c.write(off, &pattern(seed, len), 0).await.unwrap();
            c.disconnect().await.unwrap();
        })
    };
    write(0, 2 * CS as usize, 1);
    s.cli(&["snapshot", "create", "v", "a"]);
    write(5 * CS + 100, 4096, 2); // part of cluster 5
    rt.block_on(async {
        let c = Client::connect(s.addr(), ClientOptions::new("v")).await.unwrap();
        c.trim(CS, CS as u32).await.unwrap(); // all of cluster 1
        c.disconnect().await.unwrap();
    });
    s.cli(&["snapshot", "create", "v", "b"]);
    write(10 * CS, 4096, 3);

    assert_eq!(ranges(&s, &["diff", "v@a", "v@b"]), [(CS, CS), (5 * CS, CS)]);
    assert_eq!(ranges(&s, &["diff", "v@a", "v"]), [(CS, CS), (5 * CS, CS), (10 * CS, CS)]);
    assert_eq!(ranges(&s, &["diff", "v@b", "v"]), [(10 * CS, CS)]);
    assert_eq!(ranges(&s, &["allocated", "v@a"]), [(0, 2 * CS)]);
    assert_eq!(ranges(&s, &["allocated", "v"]), [(0, CS), (5 * CS, CS), (10 * CS, CS)]);
    let out = s.cli_output(&["snapshot", "diff", "v@b", "v@a"]);
    assert!(!out.status.success(), "a later base must be refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an earlier snapshot"));
    let table = s.cli(&["snapshot", "diff", "v@a", "v"]);
    assert!(table.contains("3 range(s)"), "{table}");

    if !require("nbdinfo") {
        return;
    }
    // The same through NBD: flag 1 on exactly the changed clusters.
    let map = run(Command::new("nbdinfo").arg("--map=thinbd:changed:a").arg(s.uri("v")));
    let changed: Vec<(u64, u64)> = map
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[2] == "1").then(|| (f[0].parse().unwrap(), f[1].parse().unwrap()))
        })
        .collect();
    assert_eq!(changed, [(CS, CS), (5 * CS, CS), (10 * CS, CS)], "nbdinfo --map:\n{map}");
    let map_b = run(Command::new("nbdinfo").arg("--map=thinbd:changed:a").arg(s.uri("v@b")));
    assert!(map_b.lines().filter(|l| l.split_whitespace().nth(2) == Some("1")).count() == 2, "{map_b}");
    // A snapshot that is not earlier is not offered.
    let refused = Command::new("nbdinfo").arg("--map=thinbd:changed:b").arg(s.uri("v@a")).output().unwrap();
    assert!(!refused.status.success(), "v@a offered changes since the later v@b");
}

#[test]
fn incremental_backup_equals_the_later_snapshot() {
    if !require("qemu-img") {
        return;
    }
    let s = Server::start();
    s.create_volume("db", "16MiB");
    let rt = runtime();
    rt.block_on(async {
        let c = Client::connect(s.addr(), ClientOptions::new("db")).await.unwrap();
        c.write(0, &pattern(10, 16 << 20), 0).await.unwrap();
        c.disconnect().await.unwrap();
    });
    s.cli(&["snapshot", "create", "db", "monday"]);
    rt.block_on(async {
        // Scattered writes, unaligned ones among them, and a trim.
        let c = Client::connect(s.addr(), ClientOptions::new("db")).await.unwrap();
        let mut x = 99u64;
        for i in 0..150u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let off = (x >> 33) % ((16 << 20) - 8192);
            c.write(off, &pattern(1000 + i, 1 + (x % 8000) as usize), 0).await.unwrap();
        }
        c.trim(3 << 20, 1 << 20).await.unwrap();
        c.disconnect().await.unwrap();
    });
    s.cli(&["snapshot", "create", "db", "tuesday"]);
    let dir = tempfile::tempdir().unwrap();
    let backup = dir.path().join("backup.img");
    let tuesday = dir.path().join("tuesday.img");
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(s.uri("db@monday")).arg(&backup));
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(s.uri("db@tuesday")).arg(&tuesday));
    let changes = ranges(&s, &["diff", "db@monday", "db@tuesday"]);
    let total: u64 = changes.iter().map(|(_, l)| l).sum();
    assert!(!changes.is_empty() && total < 16 << 20, "{} bytes changed of 16 MiB", total);
    // Apply only the changed ranges, read from the later snapshot.
    let mut img = std::fs::read(&backup).unwrap();
    rt.block_on(async {
        let c = Client::connect(s.addr(), ClientOptions::new("db@tuesday")).await.unwrap();
        for (off, len) in &changes {
            let data = c.read(*off, *len as u32).await.unwrap();
            img[*off as usize..(*off + *len) as usize].copy_from_slice(&data);
        }
        c.disconnect().await.unwrap();
    });
    assert!(img == std::fs::read(&tuesday).unwrap(), "the incremental backup differs from db@tuesday");
}
