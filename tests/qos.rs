//! Per-volume QoS through the real binary: IOPS and bandwidth limits hold for all connections of
//! a volume together, change on a live volume without reconnecting, persist, show in `volume
//! show` and the metrics, and leave other volumes alone. Rates are measured with our own client
//! over several seconds; the tolerances cover the burst and scheduling noise, not speed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use thinbd_protocol::client::{Client, ClientOptions};
use thinbd_tests::{Server, runtime};

/// Requests per second that `clients` connections, each keeping `depth` 4 KiB reads (or
/// `chunk`-byte writes) in flight, complete on `export` in `secs`.
async fn rate(s: &Server, export: &str, clients: usize, depth: usize, write: Option<usize>, secs: f64) -> f64 {
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(Arc::new(Client::connect(s.addr(), ClientOptions::new(export)).await.unwrap()));
    }
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for c in &conns {
        for d in 0..depth {
            let (c, done) = (c.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let buf = write.map(|n| vec![0x5a; n]);
                let mut i = d as u64;
                while Instant::now() < end {
                    let off = (i % 256) * 4096;
                    match &buf {
                        Some(b) => c.write(off, b, 0).await.unwrap(),
                        None => drop(c.read(off, 4096).await.unwrap()),
                    }
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    i += 7;
                }
            }));
        }
    }
    let started = Instant::now();
    for t in tasks {
        t.await.unwrap();
    }
    let n = done.load(std::sync::atomic::Ordering::Relaxed) as f64;
    n / started.elapsed().as_secs_f64()
}

fn within(measured: f64, want: f64, tolerance: f64) -> bool {
    (measured - want).abs() <= want * tolerance
}

#[test]
fn iops_limits_hold_change_live_and_persist() {
    let mut s = Server::start();
    s.cli(&["volume", "create", "limited", "--size", "16MiB", "--max-iops", "400"]);
    s.create_volume("free", "16MiB");
    let rt = runtime();
    rt.block_on(async {
        // Two connections share the volume's limit.
        let r = rate(&s, "limited", 2, 8, None, 3.0).await;
        assert!(within(r, 400.0, 0.15), "limited to 400 IOPS, measured {r:.0}");
        // Beside it, an unlimited volume is not slowed.
        let (limited, free) = tokio::join!(rate(&s, "limited", 1, 8, None, 2.0), rate(&s, "free", 1, 8, None, 2.0));
        assert!(within(limited, 400.0, 0.15), "{limited:.0}");
        assert!(free > 4.0 * 400.0, "an unlimited volume ran at {free:.0} IOPS next to a limited one");
    });
    // A new limit applies to the open connections too: measure through one opened before.
    rt.block_on(async {
        let c = Client::connect(s.addr(), ClientOptions::new("limited")).await.unwrap();
        s.cli(&["volume", "set-qos", "limited", "--max-iops", "100"]);
        let start = Instant::now();
        for i in 0..200u64 {
            c.read(i * 4096, 4096).await.unwrap();
        }
        let r = 200.0 / start.elapsed().as_secs_f64();
        assert!(within(r, 100.0, 0.15), "after set-qos 100, an open connection did {r:.0} IOPS");
        c.disconnect().await.unwrap();
    });
    let v = s.volume_json("limited");
    assert_eq!(v["qos"]["iops"], 100, "{v}");
    assert!(v["throttled_seconds"].as_f64().unwrap() > 0.5, "{v}");
    let metrics = s.metrics();
    assert!(metrics.contains("thinbd_volume_qos_limit{volume=\"limited\",limit=\"iops\"} 100"), "{metrics}");
    assert!(metrics.contains("thinbd_volume_throttled_seconds_total{volume=\"limited\"}"));
    // Limits survive a restart; clearing them lifts the limit.
    s.stop();
    s.spawn();
    assert_eq!(s.volume_json("limited")["qos"]["iops"], 100);
    s.cli(&["volume", "set-qos", "limited"]);
    assert_eq!(s.volume_json("limited")["qos"]["iops"], 0);
    let r = rt.block_on(rate(&s, "limited", 1, 8, None, 1.0));
    assert!(r > 1000.0, "cleared limits still throttle: {r:.0} IOPS");
}

#[test]
fn bandwidth_limits_count_bytes() {
    let s = Server::start();
    s.cli(&["volume", "create", "bw", "--size", "16MiB", "--max-write-bandwidth", "4MiB", "--max-read-iops", "300"]);
    let rt = runtime();
    rt.block_on(async {
        // 64 KiB writes at 4 MiB/s: 64 per second. Reads are limited separately.
        let w = rate(&s, "bw", 1, 4, Some(64 << 10), 3.0).await;
        assert!(within(w, 64.0, 0.15), "4 MiB/s of 64 KiB writes, measured {w:.1}/s");
        let r = rate(&s, "bw", 1, 8, None, 2.0).await;
        assert!(within(r, 300.0, 0.15), "read IOPS limit 300, measured {r:.0}");
    });
}
