//! The metrics page. Numbers are kept lock-free where requests pass (atomics and the
//! [`Histogram`] here: `prometheus-client`'s own histogram takes a lock per observation) and
//! encoded only when scraped, in the OpenMetrics text format by the `prometheus-client` crate.
//! Each part of the daemon (engine, NBD listener, cluster, stage timing) is a [`Source`]
//! registered once in the page's [`Registry`] that reads its numbers at scrape time, so volumes
//! that come and go need no registration.

use std::fmt::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use prometheus_client::collector::Collector;
pub use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, LabelSetEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::error::ErrorKind;

/// MIME type of the page (Prometheus asks for it first).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A part of the daemon that writes its series when the page is scraped.
pub struct Source<F>(pub &'static str, pub F);

impl<F> fmt::Debug for Source<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Source({})", self.0)
    }
}

impl<F: Fn(&mut DescriptorEncoder<'_>) -> fmt::Result + Send + Sync + 'static> Collector for Source<F> {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        (self.1)(&mut encoder)
    }
}

/// The page: every source's series in the order registered, then `# EOF`.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::with_capacity(16 << 10);
    // Writing to a String fails only if a source returns an error, which they do only on a
    // failed write: none.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "metrics page incomplete");
    }
    out
}

/// Label pairs of one series, values escaped (the crate writes them as given, and volume names
/// are the user's).
struct Labels<'a>(&'a [(&'a str, &'a str)]);

impl EncodeLabelSet for Labels<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> fmt::Result {
        for (k, v) in self.0 {
            let mut label = encoder.encode_label();
            let mut key = label.encode_label_key()?;
            key.write_str(k)?;
            let mut value = key.encode_label_value()?;
            for c in v.chars() {
                match c {
                    '\\' => value.write_str("\\\\")?,
                    '"' => value.write_str("\\\"")?,
                    '\n' => value.write_str("\\n")?,
                    c => value.write_char(c)?,
                }
            }
            value.finish()?;
        }
        Ok(())
    }
}

/// One metric family being written: its HELP and TYPE, then a series per label set.
pub struct Family<'e>(MetricEncoder<'e>);

impl<'e> Family<'e> {
    /// `name` as OpenMetrics spells a family: counters without their `_total`.
    pub fn start(
        enc: &'e mut DescriptorEncoder<'_>,
        name: &'e str,
        help: &str,
        kind: MetricType,
    ) -> Result<Family<'e>, fmt::Error> {
        Ok(Family(enc.encode_descriptor(name, help, None, kind)?))
    }

    /// A series with `labels` (at least one).
    pub fn series(&mut self, labels: &[(&str, &str)], metric: &impl EncodeMetric) -> fmt::Result {
        metric.encode(self.0.encode_family(&Labels(labels))?)
    }

    pub fn counter(&mut self, labels: &[(&str, &str)], value: u64) -> fmt::Result {
        self.series(labels, &ConstCounter::new(value))
    }

    pub fn gauge(&mut self, labels: &[(&str, &str)], value: u64) -> fmt::Result {
        self.series(labels, &ConstGauge::new(value))
    }

    /// The family's only series, without labels.
    pub fn single(self, metric: &impl EncodeMetric) -> fmt::Result {
        metric.encode(self.0)
    }
}

/// A family of one unlabelled gauge.
pub fn gauge(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64) -> fmt::Result {
    Family::start(enc, name, help, MetricType::Gauge)?.single(&ConstGauge::new(value))
}

/// A family of one unlabelled counter (`name` without `_total`).
pub fn counter(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64) -> fmt::Result {
    Family::start(enc, name, help, MetricType::Counter)?.single(&ConstCounter::new(value))
}

/// Upper bounds of the latency buckets, in seconds: from a fast 4 KiB read to the kernel NBD
/// client's 30 s request timeout, so that requests near the point where the kernel gives up
/// (and the client sees an I/O error) are counted as such, not lumped together above 5 s.
const BOUNDS: [f64; 19] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
    10.0, 20.0, 30.0,
];

/// A latency histogram of atomics: observing takes no lock.
#[derive(Default, Debug)]
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
        // The first bound at or above `s`; none past the last.
        if let Some(bucket) = self.buckets.get(BOUNDS.partition_point(|b| *b < s)) {
            bucket.fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(d.as_nanos() as u64, Relaxed);
    }

    /// How many observations there were.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Times `f`.
    pub fn time<T>(&self, f: impl FnOnce() -> T) -> T {
        let started = std::time::Instant::now();
        let r = f();
        self.observe(started.elapsed());
        r
    }
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> fmt::Result {
        let mut buckets = [(0.0, 0); BOUNDS.len() + 1];
        let mut inside = 0;
        for (slot, (bound, n)) in buckets.iter_mut().zip(BOUNDS.iter().zip(&self.buckets)) {
            let n = n.load(Relaxed);
            inside += n;
            *slot = (*bound, n);
        }
        // Read after the buckets: an observation between the two reads is in a bucket but not yet
        // counted, and the count must not be below the buckets' sum.
        let count = self.count.load(Relaxed).max(inside);
        buckets[BOUNDS.len()] = (f64::MAX, count - inside);
        let sum = self.sum_ns.load(Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// How long the disk under the pool takes to make things durable: `fdatasync` of the pool
/// file, and metadata store commits (durable ones sync, the others are folded in memory).
pub fn encode_disk(
    enc: &mut DescriptorEncoder<'_>,
    sync: &Histogram,
    commit: &Histogram,
    durable_commit: &Histogram,
) -> fmt::Result {
    let help = "fdatasync of the pool file (FLUSH, FUA, journal).";
    Family::start(enc, "thinbd_pool_sync_duration_seconds", help, MetricType::Histogram)?.single(sync)?;
    let help = "Metadata store commits, durable (synced) or not.";
    let mut f = Family::start(enc, "thinbd_meta_commit_duration_seconds", help, MetricType::Histogram)?;
    f.series(&[("durable", "false")], commit)?;
    f.series(&[("durable", "true")], durable_commit)
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

/// Whether each volume keeps its own latency histograms too (`serve --volume-latency-metrics`);
/// off, a request is timed into the daemon-wide histogram only.
static PER_VOLUME_LATENCY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns per-volume latency histograms on or off for the process.
pub fn set_per_volume_latency(on: bool) {
    PER_VOLUME_LATENCY.store(on, Relaxed);
}

impl RequestLatency {
    pub fn encode(&self, enc: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let help =
            "Request latency inside the server, all volumes together (per volume: serve --volume-latency-metrics).";
        let mut f = Family::start(enc, "thinbd_request_duration_seconds", help, MetricType::Histogram)?;
        for op in Op::ALL {
            f.series(&[("op", op.name())], &self.by_op[op as usize])?;
        }
        Ok(())
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
        if PER_VOLUME_LATENCY.load(Relaxed) {
            self.latency[i].observe(took);
        }
        REQUEST_LATENCY.by_op[i].observe(took);
    }
}

/// One volume's numbers at scrape time.
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

/// A volume's QoS at scrape time: its limits and how long requests waited for them.
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

/// What this daemon is and how it drives its pool: `thinbd_build_info{version}` and
/// `thinbd_pool_info{io_engine,io_engine_requested,direct_io}`, so that an alert can catch a
/// node that fell back from io_uring to threads.
pub fn encode_info(enc: &mut DescriptorEncoder<'_>, io_engine: &str, requested: &str, direct_io: bool) -> fmt::Result {
    let info = |labels| prometheus_client::metrics::info::Info::new(labels);
    Family::start(enc, "thinbd_build", "The daemon's version.", MetricType::Info)?
        .single(&info(vec![("version", env!("CARGO_PKG_VERSION").to_string())]))?;
    Family::start(enc, "thinbd_pool", "How pool I/O is done, and what was asked for.", MetricType::Info)?.single(&info(
        vec![
            ("io_engine", io_engine.to_string()),
            ("io_engine_requested", requested.to_string()),
            ("direct_io", direct_io.to_string()),
        ],
    ))
}

/// The pool's and every volume's series, with a latency histogram per volume when they are on
/// (132 series each, so off by default: `serve --volume-latency-metrics`).
pub fn encode_volumes(enc: &mut DescriptorEncoder<'_>, pool: &PoolSample, volumes: &[VolumeSample<'_>]) -> fmt::Result {
    gauge(enc, "thinbd_pool_capacity_bytes", "Pool capacity.", pool.capacity)?;
    gauge(enc, "thinbd_pool_used_bytes", "Pool bytes in use by volumes.", pool.used)?;
    gauge(enc, "thinbd_pool_cluster_size_bytes", "Allocation unit.", pool.cluster_size)?;
    gauge(enc, "thinbd_volumes", "Number of volumes.", volumes.len() as u64)?;

    type Value = fn(&VolumeSample<'_>) -> u64;
    let gauges: [(&str, &str, Value); 5] = [
        ("thinbd_volume_size_bytes", "Virtual size of the volume.", |v| v.size),
        ("thinbd_volume_allocated_bytes", "Bytes of clusters with data the volume reads.", |v| v.allocated),
        ("thinbd_volume_exclusive_bytes", "Allocated bytes only this volume references.", |v| v.exclusive),
        ("thinbd_volume_shared_bytes", "Allocated bytes shared with snapshots and clones.", |v| v.shared),
        ("thinbd_volume_sessions", "Open NBD sessions.", |v| v.sessions.into()),
    ];
    for (name, help, value) in gauges {
        let mut f = Family::start(enc, name, help, MetricType::Gauge)?;
        for v in volumes {
            f.gauge(&[("volume", v.name)], value(v))?;
        }
    }
    type ByOp = fn(&VolumeMetrics) -> &[AtomicU64; 6];
    let by_op: [(&str, &str, ByOp); 2] = [
        ("thinbd_volume_ops", "Requests served, by operation.", |m| &m.ops),
        ("thinbd_volume_errors", "Requests that failed, by operation.", |m| &m.errors),
    ];
    for (name, help, counts) in by_op {
        let mut f = Family::start(enc, name, help, MetricType::Counter)?;
        for v in volumes {
            for op in Op::ALL {
                f.counter(&[("volume", v.name), ("op", op.name())], counts(v.metrics)[op as usize].load(Relaxed))?;
            }
        }
    }
    let help = "Requests that failed, by kind of failure (io, no_space, metadata, read_only, invalid, refused, unavailable, internal); kinds that never happened are left out.";
    let mut f = Family::start(enc, "thinbd_volume_errors_by_kind", help, MetricType::Counter)?;
    for v in volumes {
        for (kind, n) in ErrorKind::ALL.iter().zip(&v.metrics.error_kinds) {
            let n = n.load(Relaxed);
            if n > 0 {
                f.counter(&[("volume", v.name), ("kind", kind.name())], n)?;
            }
        }
    }
    type Bytes = fn(&VolumeMetrics) -> &AtomicU64;
    let bytes: [(&str, &str, Bytes); 2] = [
        ("thinbd_volume_read_bytes", "Bytes read.", |m| &m.bytes_read),
        ("thinbd_volume_written_bytes", "Bytes written.", |m| &m.bytes_written),
    ];
    for (name, help, counter) in bytes {
        let mut f = Family::start(enc, name, help, MetricType::Counter)?;
        for v in volumes {
            f.counter(&[("volume", v.name)], counter(v.metrics).load(Relaxed))?;
        }
    }
    if PER_VOLUME_LATENCY.load(Relaxed) {
        let help = "Request latency inside the server.";
        let mut f = Family::start(enc, "thinbd_volume_request_duration_seconds", help, MetricType::Histogram)?;
        for v in volumes {
            for op in Op::ALL {
                f.series(&[("volume", v.name), ("op", op.name())], &v.metrics.latency[op as usize])?;
            }
        }
    }
    // Snapshots have no QoS.
    let qos: Vec<(&str, QosSample)> = volumes.iter().filter_map(|v| Some((v.name, v.qos?))).collect();
    let help = "Time requests waited for QoS, summed.";
    let mut f = Family::start(enc, "thinbd_volume_throttled_seconds", help, MetricType::Counter)?;
    for (name, q) in &qos {
        f.series(&[("volume", name)], &ConstCounter::new(q.throttled_ns as f64 / 1e9))?;
    }
    let mut f =
        Family::start(enc, "thinbd_volume_throttled_requests", "Requests that waited for QoS.", MetricType::Counter)?;
    for (name, q) in &qos {
        f.counter(&[("volume", name)], q.throttled_requests)?;
    }
    let help = "QoS limits in force (per second), by limit; absent: unlimited.";
    let mut f = Family::start(enc, "thinbd_volume_qos_limit", help, MetricType::Gauge)?;
    for (name, q) in &qos {
        let l = q.limits;
        let limits = [
            ("iops", l.iops),
            ("read_iops", l.read_iops),
            ("write_iops", l.write_iops),
            ("bandwidth_bytes", l.bandwidth),
            ("read_bandwidth_bytes", l.read_bandwidth),
            ("write_bandwidth_bytes", l.write_bandwidth),
        ];
        for (limit, value) in limits.into_iter().filter(|(_, v)| *v > 0) {
            f.gauge(&[("volume", name), ("limit", limit)], value)?;
        }
    }
    REQUEST_LATENCY.encode(enc)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page of one source.
    fn page(f: impl Fn(&mut DescriptorEncoder<'_>) -> fmt::Result + Send + Sync + 'static) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Source("test", f)));
        encode(&registry)
    }

    fn volume<'a>(name: &'a str, m: &'a VolumeMetrics) -> VolumeSample<'a> {
        VolumeSample {
            name,
            size: 1 << 20,
            allocated: 65536,
            exclusive: 65536,
            shared: 0,
            sessions: 2,
            metrics: m,
            qos: None,
        }
    }

    #[test]
    fn encodes_openmetrics_text() {
        set_per_volume_latency(true);
        let m = std::sync::Arc::new(VolumeMetrics::default());
        m.record(Op::Write, std::time::Instant::now(), None);
        m.record(Op::Write, std::time::Instant::now(), Some(ErrorKind::NoSpace));
        m.bytes_written.fetch_add(4096, Relaxed);
        let pool = || PoolSample { capacity: 1 << 30, used: 65536, cluster_size: 65536 };
        let all = m.clone();
        let text = page(move |enc| encode_volumes(enc, &pool(), &[volume("v\"1", &all)]));
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("# TYPE thinbd_volume_ops counter\n"), "{text}");
        assert!(text.contains("thinbd_pool_capacity_bytes 1073741824\n"), "{text}");
        assert!(text.contains("thinbd_volume_ops_total{volume=\"v\\\"1\",op=\"write\"} 2\n"), "{text}");
        assert!(text.contains("thinbd_volume_errors_total{volume=\"v\\\"1\",op=\"write\"} 1\n"));
        assert!(text.contains("thinbd_volume_errors_by_kind_total{volume=\"v\\\"1\",kind=\"no_space\"} 1\n"));
        assert!(!text.contains("kind=\"io\""), "kinds that never happened are left out");
        assert!(text.contains("thinbd_volume_written_bytes_total{volume=\"v\\\"1\"} 4096\n"));
        assert!(text.contains("thinbd_volume_request_duration_seconds_count{volume=\"v\\\"1\",op=\"write\"} 2\n"));
        assert!(text.contains("_bucket{le=\"+Inf\",volume=\"v\\\"1\",op=\"write\"} 2\n"), "{text}");
        assert!(text.contains("thinbd_request_duration_seconds_count{op=\"write\"} "), "all volumes together");
        set_per_volume_latency(false);
        let lean = m.clone();
        let lean = page(move |enc| encode_volumes(enc, &pool(), &[volume("w", &lean)]));
        assert!(!lean.contains("thinbd_volume_request_duration_seconds"), "per-volume histograms are opt-in");
        assert!(lean.contains("thinbd_volume_ops_total{volume=\"w\",op=\"write\"} 2\n"));
        // Every sample line is `name{labels} value` or `name value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap_or("");
            assert!(value.parse::<f64>().is_ok(), "bad sample line {line:?}");
        }
    }

    #[test]
    fn histograms_reach_the_kernel_timeout_and_unlabelled_series_have_no_braces() {
        let hists = std::sync::Arc::new([Histogram::new(), Histogram::new(), Histogram::new()]);
        hists[0].observe(Duration::from_micros(300));
        // 25 s is under the kernel's 30 s timeout, above 20 s; 40 s is beyond every bound.
        hists[1].observe(Duration::from_secs(25));
        hists[1].observe(Duration::from_secs(40));
        let h = hists.clone();
        let disk = page(move |enc| encode_disk(enc, &h[0], &h[1], &h[2]));
        assert!(disk.contains("thinbd_pool_sync_duration_seconds_bucket{le=\"0.0005\"} 1\n"), "{disk}");
        assert!(disk.contains("thinbd_pool_sync_duration_seconds_count 1\n"), "{disk}");
        assert!(disk.contains("thinbd_meta_commit_duration_seconds_count{durable=\"true\"} 0\n"), "{disk}");
        let commit = |le: &str, n: u64| {
            format!("thinbd_meta_commit_duration_seconds_bucket{{le=\"{le}\",durable=\"false\"}} {n}\n")
        };
        assert!(disk.contains(&commit("20.0", 0)), "{disk}");
        assert!(disk.contains(&commit("30.0", 1)), "{disk}");
        assert!(disk.contains(&commit("+Inf", 2)), "{disk}");
        assert!(!disk.contains("{}"), "{disk}");
    }

    #[test]
    fn info_series() {
        let text = page(|enc| encode_info(enc, "uring", "auto", true));
        assert!(text.contains("# TYPE thinbd_build info\n"), "{text}");
        assert!(
            text.contains("thinbd_pool_info{io_engine=\"uring\",io_engine_requested=\"auto\",direct_io=\"true\"} 1\n")
        );
    }
}
