//! Counters and latency histograms, rendered in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::error::ErrorKind;

/// Upper bounds of the latency buckets, in seconds: from a fast 4 KiB read to the kernel NBD
/// client's 30 s request timeout, so that requests near the point where the kernel gives up
/// (and the client sees an I/O error) are counted as such, not lumped together above 5 s.
const BOUNDS: [f64; 19] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
    10.0, 20.0, 30.0,
];

#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BOUNDS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    pub const fn new() -> Histogram {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; BOUNDS.len()],
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BOUNDS.iter().position(|b| s <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(d.as_nanos() as u64, Relaxed);
    }

    /// The series of this histogram as `name` with `labels` (`k="v",…`, or empty).
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let (lead, braced) = if labels.is_empty() {
            (String::new(), String::new())
        } else {
            (format!("{labels},"), format!("{{{labels}}}"))
        };
        let mut cumulative = 0;
        for (b, c) in BOUNDS.iter().zip(&self.buckets) {
            cumulative += c.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{lead}le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{lead}le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{braced} {}", self.sum_ns.load(Relaxed) as f64 / 1e9);
        let _ = writeln!(out, "{name}_count{braced} {count}");
    }

    /// Times `f`.
    pub fn time<T>(&self, f: impl FnOnce() -> T) -> T {
        let started = std::time::Instant::now();
        let r = f();
        self.observe(started.elapsed());
        r
    }
}

/// How long the disk under the pool takes to make things durable: `fdatasync` of the pool
/// file, and metadata store commits (durable ones sync, the others are folded in memory).
pub fn render_disk(out: &mut String, sync: &Histogram, commit: &Histogram, durable_commit: &Histogram) {
    let _ = writeln!(
        out,
        "# HELP thinbd_pool_sync_duration_seconds fdatasync of the pool file (FLUSH, FUA, journal).\n# TYPE thinbd_pool_sync_duration_seconds histogram"
    );
    sync.render(out, "thinbd_pool_sync_duration_seconds", "");
    let _ = writeln!(
        out,
        "# HELP thinbd_meta_commit_duration_seconds Metadata store commits, durable (synced) or not.\n# TYPE thinbd_meta_commit_duration_seconds histogram"
    );
    commit.render(out, "thinbd_meta_commit_duration_seconds", "durable=\"false\"");
    durable_commit.render(out, "thinbd_meta_commit_duration_seconds", "durable=\"true\"");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    BlockStatus,
}

impl Op {
    const ALL: [Op; 6] = [Op::Read, Op::Write, Op::Flush, Op::Trim, Op::WriteZeroes, Op::BlockStatus];
    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write_zeroes",
            Op::BlockStatus => "block_status",
        }
    }
}

/// Request latency of every volume together, by operation: `thinbd_request_duration_seconds`.
/// Process-wide (one daemon per process), so that it keeps counting across volumes that come
/// and go, as a counter must.
pub static REQUEST_LATENCY: RequestLatency = RequestLatency { by_op: [const { Histogram::new() }; 6] };

pub struct RequestLatency {
    by_op: [Histogram; 6],
}

impl RequestLatency {
    pub fn render(&self, out: &mut String) {
        let name = "thinbd_request_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Request latency inside the server, all volumes together (per volume: serve --volume-latency-metrics).\n# TYPE {name} histogram"
        );
        for op in Op::ALL {
            self.by_op[op as usize].render(out, name, &format!("op=\"{}\"", op.name()));
        }
    }
}

/// Per-volume request metrics.
#[derive(Default)]
pub struct VolumeMetrics {
    ops: [AtomicU64; 6],
    errors: [AtomicU64; 6],
    /// Failed requests by [`ErrorKind`] (all operations).
    error_kinds: [AtomicU64; ErrorKind::ALL.len()],
    latency: [Histogram; 6],
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
}

impl VolumeMetrics {
    /// One request of `op`, started at `started`, failed with `error` or not.
    pub fn record(&self, op: Op, started: std::time::Instant, error: Option<ErrorKind>) {
        let i = op as usize;
        self.ops[i].fetch_add(1, Relaxed);
        if let Some(kind) = error {
            self.errors[i].fetch_add(1, Relaxed);
            self.error_kinds[kind as usize].fetch_add(1, Relaxed);
        }
        let took = started.elapsed();
        self.latency[i].observe(took);
        REQUEST_LATENCY.by_op[i].observe(took);
    }
}

/// One volume's numbers at render time.
pub struct VolumeSample<'a> {
    pub name: &'a str,
    pub size: u64,
    pub allocated: u64,
    pub exclusive: u64,
    pub shared: u64,
    pub sessions: u32,
    pub metrics: &'a VolumeMetrics,
    /// Volumes have QoS, snapshots not.
    pub qos: Option<QosSample>,
}

/// A volume's QoS at render time: its limits and how long requests waited for them.
#[derive(Clone, Copy)]
pub struct QosSample {
    pub limits: crate::meta::qos::QosLimits,
    pub throttled_ns: u64,
    pub throttled_requests: u64,
}

pub struct PoolSample {
    pub capacity: u64,
    pub used: u64,
    pub cluster_size: u64,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// What this daemon is and how it drives its pool: `thinbd_build_info{version}` and
/// `thinbd_pool_info{io_engine,io_engine_requested,direct_io}` (both 1), so that an alert can
/// catch a node that fell back from io_uring to threads.
pub fn render_info(io_engine: &str, requested: &str, direct_io: bool) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# HELP thinbd_build_info The daemon's version.\n# TYPE thinbd_build_info gauge");
    let _ = writeln!(o, "thinbd_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(
        o,
        "# HELP thinbd_pool_info How pool I/O is done, and what was asked for.\n# TYPE thinbd_pool_info gauge"
    );
    let _ = writeln!(
        o,
        "thinbd_pool_info{{io_engine=\"{io_engine}\",io_engine_requested=\"{requested}\",direct_io=\"{direct_io}\"}} 1"
    );
    o
}

/// The pool's and every volume's series; `per_volume_latency`: a latency histogram per volume
/// too (132 series each, so off by default: `serve --volume-latency-metrics`).
pub fn render(pool: &PoolSample, volumes: &[VolumeSample<'_>], per_volume_latency: bool) -> String {
    let mut o = String::with_capacity(4096 + volumes.len() * 4096);
    let _ = writeln!(o, "# HELP thinbd_pool_capacity_bytes Pool capacity.\n# TYPE thinbd_pool_capacity_bytes gauge");
    let _ = writeln!(o, "thinbd_pool_capacity_bytes {}", pool.capacity);
    let _ =
        writeln!(o, "# HELP thinbd_pool_used_bytes Pool bytes in use by volumes.\n# TYPE thinbd_pool_used_bytes gauge");
    let _ = writeln!(o, "thinbd_pool_used_bytes {}", pool.used);
    let _ = writeln!(
        o,
        "# HELP thinbd_pool_cluster_size_bytes Allocation unit.\n# TYPE thinbd_pool_cluster_size_bytes gauge"
    );
    let _ = writeln!(o, "thinbd_pool_cluster_size_bytes {}", pool.cluster_size);
    let _ = writeln!(
        o,
        "# HELP thinbd_volumes Number of volumes.\n# TYPE thinbd_volumes gauge\nthinbd_volumes {}",
        volumes.len()
    );
    let headers = [
        ("thinbd_volume_size_bytes", "gauge", "Virtual size of the volume."),
        ("thinbd_volume_allocated_bytes", "gauge", "Bytes of clusters with data the volume reads."),
        ("thinbd_volume_exclusive_bytes", "gauge", "Allocated bytes only this volume references."),
        ("thinbd_volume_shared_bytes", "gauge", "Allocated bytes shared with snapshots and clones."),
        ("thinbd_volume_sessions", "gauge", "Open NBD sessions."),
        ("thinbd_volume_ops_total", "counter", "Requests served, by operation."),
        ("thinbd_volume_errors_total", "counter", "Requests that failed, by operation."),
        (
            "thinbd_volume_errors_by_kind_total",
            "counter",
            "Requests that failed, by kind of failure (io, no_space, metadata, read_only, invalid, refused, unavailable, internal); kinds that never happened are left out.",
        ),
        ("thinbd_volume_read_bytes_total", "counter", "Bytes read."),
        ("thinbd_volume_written_bytes_total", "counter", "Bytes written."),
        ("thinbd_volume_request_duration_seconds", "histogram", "Request latency inside the server."),
        ("thinbd_volume_throttled_seconds_total", "counter", "Time requests waited for QoS, summed."),
        ("thinbd_volume_throttled_requests_total", "counter", "Requests that waited for QoS."),
        ("thinbd_volume_qos_limit", "gauge", "QoS limits in force (per second), by limit; absent: unlimited."),
    ];
    for (name, kind, help) in headers {
        if name == "thinbd_volume_request_duration_seconds" && !per_volume_latency {
            continue;
        }
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for v in volumes {
            let l = format!("volume=\"{}\"", escape(v.name));
            let m = v.metrics;
            let simple = match name {
                "thinbd_volume_size_bytes" => Some(v.size),
                "thinbd_volume_allocated_bytes" => Some(v.allocated),
                "thinbd_volume_exclusive_bytes" => Some(v.exclusive),
                "thinbd_volume_shared_bytes" => Some(v.shared),
                "thinbd_volume_sessions" => Some(v.sessions as u64),
                "thinbd_volume_read_bytes_total" => Some(m.bytes_read.load(Relaxed)),
                "thinbd_volume_written_bytes_total" => Some(m.bytes_written.load(Relaxed)),
                _ => None,
            };
            if let Some(value) = simple {
                let _ = writeln!(o, "{name}{{{l}}} {value}");
                continue;
            }
            match (name, v.qos) {
                ("thinbd_volume_ops_total" | "thinbd_volume_errors_total", _) => {
                    let arr = if name == "thinbd_volume_ops_total" { &m.ops } else { &m.errors };
                    for op in Op::ALL {
                        let _ = writeln!(o, "{name}{{{l},op=\"{}\"}} {}", op.name(), arr[op as usize].load(Relaxed));
                    }
                }
                ("thinbd_volume_errors_by_kind_total", _) => {
                    for (kind, n) in ErrorKind::ALL.iter().zip(&m.error_kinds) {
                        let n = n.load(Relaxed);
                        if n > 0 {
                            let _ = writeln!(o, "{name}{{{l},kind=\"{}\"}} {n}", kind.name());
                        }
                    }
                }
                ("thinbd_volume_throttled_seconds_total", Some(q)) => {
                    let _ = writeln!(o, "{name}{{{l}}} {}", q.throttled_ns as f64 / 1e9);
                }
                ("thinbd_volume_throttled_requests_total", Some(q)) => {
                    let _ = writeln!(o, "{name}{{{l}}} {}", q.throttled_requests);
                }
                ("thinbd_volume_qos_limit", Some(q)) => {
                    let q = q.limits;
                    let limits = [
                        ("iops", q.iops),
                        ("read_iops", q.read_iops),
                        ("write_iops", q.write_iops),
                        ("bandwidth_bytes", q.bandwidth),
                        ("read_bandwidth_bytes", q.read_bandwidth),
                        ("write_bandwidth_bytes", q.write_bandwidth),
                    ];
                    for (limit, value) in limits.into_iter().filter(|(_, v)| *v > 0) {
                        let _ = writeln!(o, "{name}{{{l},limit=\"{limit}\"}} {value}");
                    }
                }
                ("thinbd_volume_request_duration_seconds", _) => {
                    for op in Op::ALL {
                        m.latency[op as usize].render(&mut o, name, &format!("{l},op=\"{}\"", op.name()));
                    }
                }
                // Snapshots have no QoS.
                _ => {}
            }
        }
    }
    REQUEST_LATENCY.render(&mut o);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = VolumeMetrics::default();
        m.record(Op::Write, std::time::Instant::now(), None);
        m.record(Op::Write, std::time::Instant::now(), Some(ErrorKind::NoSpace));
        m.bytes_written.fetch_add(4096, Relaxed);
        let pool = PoolSample { capacity: 1 << 30, used: 65536, cluster_size: 65536 };
        let text = render(
            &pool,
            &[VolumeSample {
                name: "v\"1",
                size: 1 << 20,
                allocated: 65536,
                exclusive: 65536,
                shared: 0,
                sessions: 2,
                metrics: &m,
                qos: None,
            }],
            true,
        );
        assert!(text.contains("thinbd_pool_capacity_bytes 1073741824\n"));
        assert!(text.contains("thinbd_volume_ops_total{volume=\"v\\\"1\",op=\"write\"} 2\n"));
        assert!(text.contains("thinbd_volume_errors_total{volume=\"v\\\"1\",op=\"write\"} 1\n"));
        assert!(text.contains("thinbd_volume_errors_by_kind_total{volume=\"v\\\"1\",kind=\"no_space\"} 1\n"));
        assert!(!text.contains("kind=\"io\""), "kinds that never happened are left out");
        assert!(text.contains("thinbd_volume_written_bytes_total{volume=\"v\\\"1\"} 4096\n"));
        assert!(text.contains("thinbd_volume_request_duration_seconds_count{volume=\"v\\\"1\",op=\"write\"} 2\n"));
        assert!(text.contains("le=\"+Inf\"} 2\n"));
        assert!(text.contains("thinbd_request_duration_seconds_count{op=\"write\"} "), "all volumes together");
        let lean = render(
            &pool,
            &[VolumeSample {
                name: "w",
                size: 1,
                allocated: 0,
                exclusive: 0,
                shared: 0,
                sessions: 0,
                metrics: &m,
                qos: None,
            }],
            false,
        );
        assert!(!lean.contains("thinbd_volume_request_duration_seconds"), "per-volume histograms are opt-in");
        assert!(lean.contains("thinbd_volume_ops_total{volume=\"w\",op=\"write\"} 2\n"));
        // Without labels: no empty braces, no leading comma.
        let (sync, commit, durable) = (Histogram::default(), Histogram::default(), Histogram::default());
        sync.observe(Duration::from_micros(300));
        let mut disk = String::new();
        render_disk(&mut disk, &sync, &commit, &durable);
        assert!(disk.contains("thinbd_pool_sync_duration_seconds_bucket{le=\"0.0005\"} 1\n"), "{disk}");
        assert!(disk.contains("thinbd_pool_sync_duration_seconds_count 1\n"), "{disk}");
        assert!(disk.contains("thinbd_meta_commit_duration_seconds_count{durable=\"true\"} 0\n"), "{disk}");
        // A request that took 25 s is under the kernel's 30 s timeout, above 20 s.
        let h = Histogram::default();
        h.observe(Duration::from_secs(25));
        let mut out = String::new();
        h.render(&mut out, "x", "op=\"write\"");
        assert!(out.contains("x_bucket{op=\"write\",le=\"20\"} 0\n"), "{out}");
        assert!(out.contains("x_bucket{op=\"write\",le=\"30\"} 1\n"), "{out}");
        // Every sample line is `name{labels} value` or `name value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap_or("");
            assert!(value.parse::<f64>().is_ok(), "bad sample line {line:?}");
        }
    }
}
