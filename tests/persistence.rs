//! Volumes and data survive SIGTERM and kill -9 (after FLUSH); the data dir is locked; the CLI
//! and metrics behave as the README says.

use std::process::Command;

use thinbd_protocol::client::{Client, ClientOptions};
use thinbd_tests::{Server, pattern, runtime, thinbd_bin};

async fn connect(s: &Server, name: &str) -> Client {
    Client::connect(s.addr(), ClientOptions::new(name)).await.expect("connect")
}

#[test]
fn data_survives_sigterm_restart() {
    let rt = runtime();
    let mut s = Server::start();
    s.create_volume("keep", "32MiB");
    let a = pattern(11, 300_000);
    rt.block_on(async {
        let c = connect(&s, "keep").await;
        c.write(12_345, &a, 0).await.unwrap();
        // No FLUSH: a clean shutdown must make completed writes durable by itself.
        c.disconnect().await.unwrap();
    });
    assert!(s.stop().success(), "clean exit:\n{}", s.log_text());
    assert!(s.log_text().contains("stopped cleanly"));
    s.spawn();
    rt.block_on(async {
        let c = connect(&s, "keep").await;
        assert_eq!(c.size, 32 << 20);
        assert!(c.read(12_345, a.len() as u32).await.unwrap() == a);
    });
    let v = s.volume_json("keep");
    assert_eq!(v["size_bytes"], 32u64 << 20);
}

#[test]
fn flushed_writes_survive_kill_9() {
    let rt = runtime();
    let mut s = Server::start();
    s.create_volume("crash", "64MiB");
    let mut expected = Vec::new();
    rt.block_on(async {
        let c = connect(&s, "crash").await;
        for i in 0..64u64 {
            let data = pattern(i, 40_000);
            let off = i * 1_000_003 % (60 << 20);
            c.write(off, &data, 0).await.unwrap();
            expected.push((off, data));
        }
        c.flush().await.unwrap();
        // A FUA write is durable on its own.
        let fua = pattern(999, 5000);
        c.write(63 << 20, &fua, thinbd_protocol::consts::CMD_FLAG_FUA).await.unwrap();
        expected.push((63 << 20, fua));
    });
    s.kill9();
    s.spawn();
    rt.block_on(async {
        let c = connect(&s, "crash").await;
        // Later writes may overlap earlier ones: check the final content in write order.
        let mut image = vec![0u8; 64 << 20];
        for (off, d) in &expected {
            image[*off as usize..*off as usize + d.len()].copy_from_slice(d);
        }
        let got = c.read(0, 32 << 20).await.unwrap();
        let got2 = c.read(32 << 20, 32 << 20).await.unwrap();
        assert!(got == image[..32 << 20] && got2 == image[32 << 20..], "flushed data lost after kill -9");
    });
    // The first writes' mappings were made durable by the FLUSH through the journal (no
    // durable metadata commit), so the restart found them there.
    assert!(s.log_text().contains("journal replayed"), "no journal replay after kill -9:\n{}", s.log_text());
}

#[test]
fn second_daemon_on_same_data_dir_is_refused() {
    let s = Server::start();
    let out = Command::new(thinbd_bin())
        .args(["serve", "--data-dir"])
        .arg(&s.data_dir)
        .args(["--nbd-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another thinbd"), "{err}");
}

#[test]
fn cli_manages_volumes_with_clear_errors() {
    let rt = runtime();
    let s = Server::start();
    let out = s.cli(&["volume", "create", "v1", "--size", "512MiB", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["size_bytes"], 512u64 << 20);
    assert_eq!(v["allocated_bytes"], 0);
    s.create_volume("v2", "1073741824");
    let table = s.cli(&["volume", "list"]);
    assert!(table.contains("v1") && table.contains("512 MiB") && table.contains("1 GiB"), "{table}");
    let list: serde_json::Value = serde_json::from_str(&s.cli(&["volume", "list", "-o", "json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);

    let err = |args: &[&str]| {
        let o = s.cli_output(args);
        assert!(!o.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    assert!(err(&["volume", "create", "v1", "--size", "1GiB"]).contains("already exists"));
    assert!(err(&["volume", "create", "bad/name", "--size", "1GiB"]).contains("invalid volume name"));
    assert!(err(&["volume", "create", "x", "--size", "12XB"]).contains("unknown size unit"));
    assert!(err(&["volume", "create", "x", "--size", "1000"]).contains("multiple of 512"));
    assert!(err(&["volume", "show", "nope"]).contains("not found"));
    assert!(err(&["volume", "resize", "v1", "--size", "256MiB"]).contains("shrinking"));

    // Grow: sessions opened afterwards see the new size.
    s.cli(&["volume", "resize", "v1", "--size", "1GiB"]);
    assert_eq!(s.volume_json("v1")["size_bytes"], 1u64 << 30);
    rt.block_on(async {
        let c = connect(&s, "v1").await;
        assert_eq!(c.size, 1 << 30);
        c.write(1000 << 20, b"beyond the old end", 0).await.unwrap();
        // Deleting a volume with an open session is refused.
        let o = s.cli_output(&["volume", "delete", "v1"]);
        assert!(String::from_utf8_lossy(&o.stderr).contains("open NBD session"));
        c.disconnect().await.unwrap();
    });
    assert_eq!(s.volume_json("v1")["allocated_bytes"], 65536);
    // The session count drops once the server notices the disconnect.
    let mut deleted = false;
    for _ in 0..100 {
        if s.cli_output(&["volume", "delete", "v1"]).status.success() {
            deleted = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(deleted);
    assert!(err(&["volume", "show", "v1"]).contains("not found"));
    let pool: serde_json::Value = serde_json::from_str(&s.cli(&["pool", "-o", "json"])).unwrap();
    assert_eq!(pool["used_bytes"], 0, "deleting returned the cluster");
    assert_eq!(pool["volume_count"], 1);
    // No daemon: a readable error.
    let o = Command::new(thinbd_bin()).args(["volume", "list", "--api", "127.0.0.1:1"]).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot reach thinbd"));
}

#[test]
fn metrics_report_ops_bytes_latency_and_pool() {
    let rt = runtime();
    let s = Server::start_with(&["--capacity", "1GiB", "--volume-latency-metrics"]);
    s.create_volume("m", "16MiB");
    rt.block_on(async {
        let c = connect(&s, "m").await;
        c.write(0, &[7u8; 8192], 0).await.unwrap();
        c.read(0, 4096).await.unwrap();
        c.flush().await.unwrap();
    });
    let m = s.metrics();
    for needle in [
        "thinbd_pool_capacity_bytes 1073741824",
        "thinbd_pool_used_bytes 65536",
        "thinbd_volume_ops_total{volume=\"m\",op=\"write\"} 1",
        "thinbd_volume_ops_total{volume=\"m\",op=\"read\"} 1",
        "thinbd_volume_ops_total{volume=\"m\",op=\"flush\"} 1",
        "thinbd_volume_written_bytes_total{volume=\"m\"} 8192",
        "thinbd_volume_read_bytes_total{volume=\"m\"} 4096",
        "thinbd_volume_request_duration_seconds_count{volume=\"m\",op=\"write\"} 1",
        "# TYPE thinbd_volume_request_duration_seconds histogram",
        "# TYPE thinbd_request_duration_seconds histogram",
    ] {
        assert!(m.contains(needle), "missing {needle:?} in\n{m}");
    }
}

/// Probes: `/healthz` (alive) and `/readyz` (takes work) on the metrics port, and the
/// standard gRPC health service on the management API, SERVING until shutdown.
#[test]
fn health_endpoints_and_the_grpc_health_service_answer() {
    let s = Server::start();
    let live = s.http_get("/healthz");
    assert!(live.starts_with("HTTP/1.0 200") && live.ends_with("ok\n"), "{live}");
    let ready = s.http_get("/readyz");
    assert!(ready.starts_with("HTTP/1.0 200") && ready.ends_with("ready\n"), "{ready}");
    let status = runtime().block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", s.api_port))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let asked = tonic_health::pb::HealthCheckRequest { service: String::new() };
        health.check(asked).await.unwrap().into_inner().status
    });
    assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
}

/// `--stage-latency`: every request's time, stage by stage, on the metrics page (and nothing
/// of it without the flag). The ring stages appear with the io_uring engine only.
#[test]
fn stage_latency_shows_where_requests_spend_their_time() {
    let rt = runtime();
    let plain = Server::start_with(&["--capacity", "1GiB"]);
    assert!(!plain.metrics().contains("thinbd_stage_seconds"), "stages timed without --stage-latency");
    let s = Server::start_with(&["--capacity", "1GiB", "--stage-latency"]);
    s.create_volume("st", "16MiB");
    rt.block_on(async {
        let c = connect(&s, "st").await;
        for i in 0..8u64 {
            c.write(i * 65536, &[3u8; 65536], 0).await.unwrap();
            c.read(i * 65536, 4096).await.unwrap();
        }
    });
    let count = |m: &str, stage: &str| -> u64 {
        let needle = format!("thinbd_stage_seconds_count{{stage=\"{stage}\"}} ");
        let line = m.lines().find(|l| l.starts_with(&needle)).unwrap_or_else(|| panic!("no {stage} in\n{m}"));
        line[needle.len()..].parse().unwrap()
    };
    let mut stages = vec!["admit", "schedule", "execute", "reply"];
    if s.metrics().contains("io_engine=\"uring\"") || s.log_text().contains("io_engine=Uring") {
        stages.extend(["ring_queue", "ring_disk", "ring_wake"]);
    }
    // The reply stage ends once the reply is on the socket, so the client can read the last
    // reply (and ask for the metrics) a moment before the server counts it: wait for it.
    let short = |m: &str| {
        stages.iter().filter(|st| count(m, st) < 16).map(|st| format!("{st}: {}", count(m, st))).collect::<Vec<_>>()
    };
    s.metrics_when(|m| short(m).is_empty(), |m| format!("stages counted fewer than 16 requests: {:?}", short(m)));
}

#[test]
fn volumes_and_snapshots_have_stable_unique_uuids() {
    let mut s = thinbd_tests::Server::start();
    s.create_volume("a", "1MiB");
    s.create_volume("b", "1MiB");
    s.cli(&["snapshot", "create", "a", "s"]);
    let uuid = |v: &serde_json::Value| v["uuid"].as_str().unwrap_or_default().to_string();
    let (ua, ub) = (uuid(&s.volume_json("a")), uuid(&s.volume_json("b")));
    let snaps: serde_json::Value = serde_json::from_str(&s.cli(&["snapshot", "list", "-o", "json"])).unwrap();
    let us = uuid(&snaps[0]);
    for u in [&ua, &ub, &us] {
        assert_eq!(u.len(), 36, "{u:?}");
        assert_eq!(u.chars().nth(14), Some('4'), "not a version-4 UUID: {u}");
    }
    assert!(ua != ub && ua != us && ub != us);
    // Stable across a restart; a lookup by UUID finds the volume.
    s.stop();
    s.spawn();
    assert_eq!(uuid(&s.volume_json("a")), ua);
    assert_eq!(s.volume_json(&ua)["name"], "a");
}
