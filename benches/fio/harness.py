#!/usr/bin/env python3
"""fio harness: thinbd and its peers on the same disk, in one run, through fio's nbd engine.

Targets: thinbd, qemu-nbd (raw, qcow2, qcow2 overlay on a backing file), nbdkit file,
nbd-server, and the raw file itself with fio's io_uring engine and O_DIRECT (the limit; a second
row with fio's buffers in huge pages when run as root, see `HugePages`).
Prints IOPS, MB/s and p99 latency per job and target, and ratios to qemu-nbd qcow2 and to the
raw limit, as a Markdown table.

Usage: benches/fio/harness.py [--runtime 5] [--size 1G] [--dir DIR] [--only thinbd,raw]
       benches/fio/harness.py --qos      (per-volume QoS limits measured by fio)
       benches/fio/harness.py --cluster  (a volume used on its node vs through another node's target)
       benches/fio/harness.py --replication  (1/2/3 copies, rebuilds, failover; network namespaces, root)
Needs: fio, qemu-utils, nbdkit, nbd-server (scripts/setup installs them); builds thinbd (release)
unless THINBD_BIN names a binary to measure.
"""
import argparse, atexit, json, os, shutil, signal, socket, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# THINBD_BIN: a thinbd binary to measure instead of building this tree's (to compare builds).
BIN = os.environ.get("THINBD_BIN") or os.path.join(ROOT, "target", "release", "thinbd")
# The least an NBD server can do with a disk (benches/src/bin/nbd-ceiling.rs), target "ceiling".
CEILING_BIN = os.environ.get("CEILING_BIN") or os.path.join(ROOT, "target", "release", "nbd-ceiling")

# name, fio options, metric direction. Every target is prefilled (reads read data, writes
# overwrite) except in the "fresh" jobs, which write into a new target (first writes: a sparse
# raw file, a new volume or image).
FRESH = " fresh"
JOBS = [
    ("4k randread QD32", dict(rw="randread", bs="4k", iodepth=32, numjobs=1), "read"),
    ("4k randread QD32 x2", dict(rw="randread", bs="4k", iodepth=32, numjobs=2), "read"),
    ("4k randwrite QD32", dict(rw="randwrite", bs="4k", iodepth=32, numjobs=1), "write"),
    ("4k randwrite QD32" + FRESH, dict(rw="randwrite", bs="4k", iodepth=32, numjobs=1), "write"),
    ("4k randwrite QD32 x2", dict(rw="randwrite", bs="4k", iodepth=32, numjobs=2), "write"),
    ("128k seq read QD8", dict(rw="read", bs="128k", iodepth=8, numjobs=1), "read"),
    ("128k seq write QD8", dict(rw="write", bs="128k", iodepth=8, numjobs=1), "write"),
    ("1M seq read QD8", dict(rw="read", bs="1M", iodepth=8, numjobs=1), "read"),
    ("1M seq write QD8", dict(rw="write", bs="1M", iodepth=8, numjobs=1), "write"),
    ("1M seq write QD8" + FRESH, dict(rw="write", bs="1M", iodepth=8, numjobs=1), "write"),
    ("4k write QD1 + fsync", dict(rw="randwrite", bs="4k", iodepth=1, numjobs=1, fsync=1), "write"),
    ("4k write QD1 + fsync" + FRESH, dict(rw="randwrite", bs="4k", iodepth=1, numjobs=1, fsync=1), "write"),
    # Unaligned small writes: 512 bytes at 512 past a 4 KiB boundary (read-modify-write for
    # anything with 4 KiB blocks).
    ("512B randwrite QD32 at 4k+512", dict(rw="randwrite", bs="512", blockalign="4k", offset="512", size="99%",
                                          iodepth=32, numjobs=1), "write"),
    ("first write after snapshot 4k randwrite", dict(rw="randwrite", bs="4k", iodepth=32, numjobs=1), "write"),
]
COW_JOB = JOBS[-1][0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what, log=None):
    for _ in range(300):
        if proc.poll() is not None:
            tail = open(log).read()[-2000:] if log and os.path.exists(log) else ""
            sys.exit(f"{what} exited with {proc.returncode}\n{tail}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not start")


def sh(*args, **kw):
    return subprocess.run(args, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw).stdout


def fio(target, opts, runtime, size, name="job"):
    args = ["fio", f"--name={name}", "--output-format=json", "--group_reporting", f"--size={size}",
            "--time_based", f"--runtime={runtime}", "--ramp_time=1", "--randrepeat=0", "--norandommap"]
    if target["engine"] == "nbd":
        args += ["--ioengine=nbd", f"--uri={target['uri']}"]
    else:
        args += ["--ioengine=io_uring", "--direct=1", f"--filename={target['file']}"]
        if target.get("iomem"):
            args.append(f"--iomem={target['iomem']}")
    for k, v in opts.items():
        args.append(f"--{k}={v}")
    out = sh(*args)
    return json.loads(out[out.index("{"):])["jobs"][0]


class HugePages:
    """fio's buffers in huge pages (`--iomem=mmaphuge`), for the raw file's second row: this
    machine's disk charges a direct request per physically contiguous piece of its buffer, and
    thinbd's large buffers are in huge pages (protocol/src/huge_buffers.rs). Needs root: reserves
    128 MiB of huge pages and mounts hugetlbfs for the run, then puts both back."""

    def __enter__(self):
        self.dir = tempfile.mkdtemp(prefix="thinbd-huge-")
        self.before = int(open("/proc/sys/vm/nr_hugepages").read())
        with open("/proc/sys/vm/nr_hugepages", "w") as f:
            f.write(str(max(self.before, 64)))
        sh("mount", "-t", "hugetlbfs", "none", self.dir)
        return self

    def file(self):
        return os.path.join(self.dir, "fio-buffers")

    def __exit__(self, *exc):
        subprocess.run(["umount", self.dir], check=False)
        os.rmdir(self.dir)
        with open("/proc/sys/vm/nr_hugepages", "w") as f:
            f.write(str(self.before))


def prefill(target, size):
    """Sequential 1M writes over the whole target, so reads read data (not holes) everywhere."""
    args = ["fio", "--name=prefill", f"--size={size}", "--rw=write", "--bs=1M", "--iodepth=8", "--output-format=json"]
    if target["engine"] == "nbd":
        args += ["--ioengine=nbd", f"--uri={target['uri']}"]
    else:
        args += ["--ioengine=io_uring", "--direct=1", f"--filename={target['file']}"]
    sh(*args)


class Targets:
    def __init__(self, d, size, only):
        self.d, self.size, self.only, self.procs, self.pidfiles = d, size, only, [], []

    def want(self, name):
        return not self.only or name in self.only

    def spawn(self, args, port, what, **kw):
        log = os.path.join(self.d, what + ".log")
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(log, "w"), **kw)
        self.procs.append(p)
        wait_port(port, p, what, log)
        return p

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs = []
        for pf in self.pidfiles:
            try:
                pid = int(open(pf).read().strip())
                os.kill(pid, signal.SIGTERM)
                # Its per-client children exit with their connections.
                for _ in range(100):
                    os.kill(pid, 0)
                    time.sleep(0.05)
            except (OSError, ValueError):
                pass
        self.pidfiles = []

    def image(self, name, fmt="raw", backing=None):
        path = os.path.join(self.d, name)
        if backing:
            sh("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing, path)
        elif fmt == "raw":
            with open(path, "wb") as f:
                f.truncate(self.size_bytes())
        else:
            sh("qemu-img", "create", "-q", "-f", fmt, path, str(self.size_bytes()))
        return path

    def size_bytes(self):
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        s = self.size
        return int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)

    def thinbd(self, cow=False, extra=()):
        bin_ = BIN
        data = os.path.join(self.d, "thinbd-data" + ("-cow" if cow else ""))
        nbd, api, met = free_port(), free_port(), free_port()
        self.spawn([bin_, "serve", "--data-dir", data, "--capacity", str(self.size_bytes() * 3),
                    "--nbd-listen", f"127.0.0.1:{nbd}", "--api-listen", f"127.0.0.1:{api}",
                    "--metrics-listen", f"127.0.0.1:{met}", *extra], nbd, "thinbd", env=dict(os.environ, RUST_LOG="warn"))
        cli = lambda *a: sh(bin_, *a, "--api", f"127.0.0.1:{api}")
        # The CLI of the daemon started last, for callers that manage more volumes.
        self.cli = cli
        cli("volume", "create", "bench", "--size", str(self.size_bytes()))
        t = dict(engine="nbd", uri=f"nbd://127.0.0.1:{nbd}/bench")
        if cow:
            prefill(t, self.size)
            cli("snapshot", "create", "bench", "base")
        return t

    def qemu_nbd(self, path, fmt):
        port = free_port()
        self.spawn(["qemu-nbd", "-f", fmt, "-x", "disk", "-p", str(port), "-b", "127.0.0.1", "-t", "--shared=8",
                    "--cache=none", "--aio=native", "--discard=unmap", path], port, "qemu-nbd")
        return dict(engine="nbd", uri=f"nbd://127.0.0.1:{port}/disk")

    def nbdkit(self, path):
        port = free_port()
        self.spawn(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", f"file={path}"], port, "nbdkit")
        return dict(engine="nbd", uri=f"nbd://127.0.0.1:{port}/")

    def nbdkit_memory(self):
        """nbdkit's memory plugin: no disk at all, so what fio, the loopback TCP and a minimal
        server cost alone (the protocol's ceiling here)."""
        port = free_port()
        self.spawn(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "memory", self.size], port, "nbdkit")
        return dict(engine="nbd", uri=f"nbd://127.0.0.1:{port}/")

    def ceiling(self, path):
        """nbd-ceiling: one thread and one io_uring per connection for socket and disk, nothing
        else: what any server could reach through fio's nbd engine on this disk."""
        port = free_port()
        self.spawn([CEILING_BIN, path, str(port)], port, "nbd-ceiling")
        return dict(engine="nbd", uri=f"nbd://127.0.0.1:{port}/")

    def nbd_server(self, path):
        port = free_port()
        conf = os.path.join(self.d, "nbd-server.conf")
        with open(conf, "w") as f:
            f.write(f"[generic]\nport = {port}\nlistenaddr = 127.0.0.1\n[disk]\nexportname = {path}\nflush = true\nfua = true\nmulticonn = true\n")
        # In the foreground (-d) nbd-server serves one connection at a time; let it daemonize
        # (a process per client) and stop it through its pid file.
        pidfile = os.path.join(self.d, "nbd-server.pid")
        sh("nbd-server", "-C", conf, "-p", pidfile)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        self.pidfiles.append(pidfile)
        return dict(engine="nbd", uri=f"nbd://127.0.0.1:{port}/disk")


def footprint(root_dir, size):
    """Daemon RSS with 100 volumes of 100 GiB, and metadata bytes per byte of data written."""
    with tempfile.TemporaryDirectory(dir=root_dir) as d:
        t = Targets(d, size, set())
        try:
            target = t.thinbd()
            proc = t.procs[-1]
            for i in range(100):
                t.cli("volume", "create", f"v{i}", "--size", "100GiB")
            prefill(target, size)
            subprocess.run(["fio", "--name=f", "--ioengine=nbd", f"--uri={target['uri']}", "--rw=randwrite", "--bs=4k",
                            f"--size={size}", "--io_size=64M", "--end_fsync=1", "--output-format=json"], check=True,
                           stdout=subprocess.DEVNULL)
            rss = int([l for l in open(f"/proc/{proc.pid}/status") if l.startswith("VmRSS")][0].split()[1])
            meta = os.path.getsize(os.path.join(d, "thinbd-data", "meta.redb"))
            data = t.size_bytes()
            print(f"\nfootprint: daemon RSS {rss / 1024:.1f} MiB with 101 volumes (100 of 100 GiB, one with {size} written); "
                  f"metadata file {meta / 1e6:.2f} MB for {data / 1e9:.2f} GB of data ({100 * meta / data:.3f}%)")
        finally:
            t.stop_all()


def qos(root_dir, size, runtime):
    """Per-volume QoS measured by fio: a volume limited to 2,000 IOPS, then to 500 with
    `volume set-qos` on the same server, and an unlimited volume beside it."""
    with tempfile.TemporaryDirectory(dir=root_dir) as d:
        t = Targets(d, size, set())
        try:
            free = t.thinbd()
            t.cli("volume", "create", "limited", "--size", size, "--max-iops", "2000")
            limited = dict(engine="nbd", uri=free["uri"].rsplit("/", 1)[0] + "/limited")
            prefill(free, size)
            prefill(limited, size)
            job = dict(rw="randread", bs="4k", iodepth=32, numjobs=1)
            rows = []
            alone = fio(free, job, runtime, size)["read"]["iops"]
            rows.append(("unlimited volume alone", "–", alone))
            r = fio(limited, job, runtime, size)["read"]["iops"]
            rows.append(("volume limited to 2,000 IOPS", "2000", r))
            t.cli("volume", "set-qos", "limited", "--max-iops", "500")
            r = fio(limited, job, runtime, size)["read"]["iops"]
            rows.append(("same volume after `set-qos --max-iops 500`", "500", r))
            # Both at once: two fio processes.
            args = lambda target: ["fio", "--name=q", "--output-format=json", f"--size={size}", "--time_based",
                                   f"--runtime={runtime}", "--ramp_time=1", "--ioengine=nbd", f"--uri={target['uri']}",
                                   "--rw=randread", "--bs=4k", "--iodepth=32", "--norandommap", "--randrepeat=0"]
            pl = subprocess.Popen(args(limited), stdout=subprocess.PIPE, text=True)
            pf = subprocess.Popen(args(free), stdout=subprocess.PIPE, text=True)
            out_l, out_f = pl.communicate()[0], pf.communicate()[0]
            side = json.loads(out_f[out_f.index("{"):])["jobs"][0]["read"]["iops"]
            lim = json.loads(out_l[out_l.index("{"):])["jobs"][0]["read"]["iops"]
            rows.append(("limited (500) while the unlimited one runs", "500", lim))
            rows.append(("unlimited volume beside the limited one", "–", side))
            print(f"\nQoS, fio 4k randread QD32 through the nbd engine, {runtime} s per run, {time.strftime('%Y-%m-%d')}\n")
            print("| run | limit | IOPS | vs limit |")
            print("|---|---|---|---|")
            for what, limit, iops in rows:
                vs = f"{100 * (iops / int(limit) - 1):+.1f}%" if limit != "–" else "–"
                print(f"| {what} | {limit} | {iops:.0f} | {vs} |")
        finally:
            t.stop_all()


CLUSTER_JOBS = [
    ("4k randread QD32", dict(rw="randread", bs="4k", iodepth=32, numjobs=1), "read"),
    ("4k randwrite QD32", dict(rw="randwrite", bs="4k", iodepth=32, numjobs=1), "write"),
    ("4k randread QD1", dict(rw="randread", bs="4k", iodepth=1, numjobs=1), "read"),
    ("4k randwrite QD1", dict(rw="randwrite", bs="4k", iodepth=1, numjobs=1), "write"),
    ("1M seq write QD8", dict(rw="write", bs="1M", iodepth=8, numjobs=1), "write"),
    ("1M seq read QD8", dict(rw="read", bs="1M", iodepth=8, numjobs=1), "read"),
]


def tcp_rtt_us(samples=2000):
    """Median round trip of one byte over loopback TCP (what the link adds at least)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    cli = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    for s_ in (cli, conn):
        s_.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for _ in range(samples):
        t0 = time.perf_counter_ns()
        cli.sendall(b"x")
        conn.recv(1)
        conn.sendall(b"y")
        cli.recv(1)
        times.append(time.perf_counter_ns() - t0)
    for s_ in (cli, conn, srv):
        s_.close()
    times.sort()
    return times[len(times) // 2] / 1000


def machine_busy():
    """CPU seconds every CPU spent busy so far (all processes and the kernel; not idle or iowait)."""
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids):
    """User + system CPU seconds the processes used so far."""
    total = 0
    for pid in pids:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def cluster(root_dir, size, runtime):
    """Two thinbd nodes on one etcd (loopback): the volume is held by node-a. "local" attaches
    on node-a (no hop); "forwarded" attaches on node-b, the target, which forwards every
    request to node-a over the NBD link. Both through fio's nbd engine, prefilled."""
    if not shutil.which("etcd"):
        sys.exit("etcd is missing: run scripts/setup")
    bin_ = BIN
    with tempfile.TemporaryDirectory(dir=root_dir) as d:
        t = Targets(d, size, set())
        try:
            cport, pport = free_port(), free_port()
            client, peer = f"http://127.0.0.1:{cport}", f"http://127.0.0.1:{pport}"
            t.spawn(["etcd", "--name", "e", "--data-dir", os.path.join(d, "etcd"), "--listen-client-urls", client,
                     "--advertise-client-urls", client, "--listen-peer-urls", peer,
                     "--initial-advertise-peer-urls", peer, "--initial-cluster", f"e={peer}"], cport, "etcd")
            nodes, pids = {}, []
            for name in ("node-a", "node-b"):
                nbd, api, met = free_port(), free_port(), free_port()
                t.spawn([bin_, "serve", "--data-dir", os.path.join(d, name), "--capacity", str(t.size_bytes() * 3),
                         "--nbd-listen", f"127.0.0.1:{nbd}", "--api-listen", f"127.0.0.1:{api}",
                         "--metrics-listen", f"127.0.0.1:{met}", "--etcd", client, "--node-name", name],
                        nbd, name, env=dict(os.environ, RUST_LOG="warn"))
                nodes[name] = (nbd, api)
                pids.append(t.procs[-1].pid)
            cli = lambda *a: sh(bin_, *a, "--api", f"127.0.0.1:{nodes['node-b'][1]}")
            for _ in range(100):
                if json.loads(cli("node", "list", "-o", "json"))["nodes"].__len__() == 2:
                    break
                time.sleep(0.1)
            cli("volume", "create", "bench", "--size", str(t.size_bytes()), "--node", "node-a")
            grant = json.loads(cli("volume", "publish", "bench", "--node", "app", "--single-writer", "-o", "json"))
            export = grant["export_name"].replace("#", "%23")
            local = dict(engine="nbd", uri=f"nbd://127.0.0.1:{nodes['node-a'][0]}/{export}")
            forwarded = dict(engine="nbd", uri=f"nbd://127.0.0.1:{nodes['node-b'][0]}/{export}")
            prefill(local, size)
            rows = []
            for job, opts, direction in CLUSTER_JOBS:
                got = []
                for target in (local, forwarded):
                    cpu0, t0 = cpu_seconds(pids), time.time()
                    r = fio(target, opts, runtime, size)[direction]
                    # Both daemons (the target idles in the local run), per 1,000 requests.
                    cpu = (cpu_seconds(pids) - cpu0) / (time.time() - t0)
                    pct = r["clat_ns"].get("percentile", {})
                    got.append((r["iops"], r["bw_bytes"] / 1e6, pct.get("50.000000", 0) / 1000,
                                pct.get("99.000000", 0) / 1000, cpu))
                    print(f"{job:22} {'local' if target is local else 'forwarded':10} {got[-1][0]:10.0f} IOPS "
                          f"{got[-1][1]:8.1f} MB/s p50 {got[-1][2]:6.0f} us p99 {got[-1][3]:6.0f} us "
                          f"thinbd CPU {cpu:.2f} cores", file=sys.stderr)
                rows.append((job, opts, got))
            rtt = tcp_rtt_us()
            print(f"\ncluster: a volume on node-a used on node-a (local) and through node-b's target (forwarded), "
                  f"fio {os.popen('fio --version').read().strip()} nbd engine, size {size}, {runtime} s per job, "
                  f"{os.cpu_count()} CPUs, one host (loopback), {time.strftime('%Y-%m-%d')}; loopback TCP round trip "
                  f"(median, Python) {rtt:.0f} µs\n")
            print("| job | local | forwarded | forwarded / local | p50 added by the hop | thinbd cores busy, local → forwarded |")
            print("|---|---|---|---|---|---|")
            for job, opts, (lo, fw) in rows:
                big = opts["bs"] == "1M"
                cell = lambda v: f"{v[1]:.0f} MB/s, p50 {v[2]:.0f} µs" if big else f"{v[0]/1000:.1f}k, p50 {v[2]:.0f} µs"
                print(f"| {job} | {cell(lo)} | {cell(fw)} | {fw[0]/lo[0]:.2f}× | {fw[2]-lo[2]:+.0f} µs "
                      f"| {lo[4]:.2f} → {fw[4]:.2f} |")
        finally:
            t.stop_all()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--dir", default=os.path.join(ROOT, "target", "fio-bench"))
    ap.add_argument("--only", default="", help="comma-separated targets: raw,raw-huge,thinbd,thinbd-buffered,nbdkit,"
                    "nbdkit-memory,ceiling,nbd-server,qemu-raw,qemu-qcow2,overlay (thinbd-buffered, "
                    "nbdkit-memory and ceiling run only when named)")
    ap.add_argument("--jobs", default="", help="run only jobs whose name contains this")
    ap.add_argument("--footprint-only", action="store_true")
    ap.add_argument("--qos", action="store_true", help="measure per-volume QoS limits instead")
    ap.add_argument("--cluster", action="store_true", help="measure a volume used through another node's target")
    ap.add_argument("--replication", action="store_true", help="measure 1/2/3 copies, rebuilds and failover")
    args = ap.parse_args()
    for tool in ["fio", "qemu-img", "qemu-nbd", "nbdkit", "nbd-server"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: run scripts/setup")
    if not os.environ.get("THINBD_BIN"):
        print("building thinbd (release)...", file=sys.stderr)
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "thinbd"], cwd=ROOT, check=True)
    if "ceiling" in args.only.split(",") and not os.environ.get("CEILING_BIN"):
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "thinbd-benches", "--bin", "nbd-ceiling"], cwd=ROOT, check=True)
    os.makedirs(args.dir, exist_ok=True)
    if args.footprint_only:
        footprint(args.dir, args.size)
        return
    if args.qos:
        qos(args.dir, args.size, args.runtime)
        return
    if args.cluster:
        cluster(args.dir, args.size, args.runtime)
        return
    if args.replication:
        import replication
        replication.replication(args.dir, args.size, args.runtime)
        return
    only = set(filter(None, args.only.split(",")))
    names = ["raw file (io_uring, direct)", "raw file, buffers in huge pages", "thinbd", "thinbd --buffered-io", "nbdkit file", "nbdkit memory (no disk)",
             "nbd-ceiling (least server)", "nbd-server", "qemu-nbd raw", "qemu-nbd qcow2", "qcow2 overlay (COW)"]
    keys = ["raw", "raw-huge", "thinbd", "thinbd-buffered", "nbdkit", "nbdkit-memory", "ceiling", "nbd-server", "qemu-raw", "qemu-qcow2", "overlay"]
    opt_in = ("thinbd-buffered", "nbdkit-memory", "ceiling")  # run only when --only names them
    # (job, key) -> (iops, MB/s, p99 us, server CPU ms per 1k requests, FLUSH p99 us, machine CPU us per request)
    results = {}
    huge = None
    if (not only or "raw-huge" in only) and os.geteuid() == 0:
        huge = HugePages().__enter__()
        atexit.register(huge.__exit__, None, None, None)
    elif not only or "raw-huge" in only:
        print("raw-huge needs root (huge pages for fio's buffers): skipped", file=sys.stderr)
    for key, name in zip(keys, names):
        if (only and key not in only) or (key in opt_in and key not in only) or (key == "raw-huge" and not huge):
            continue
        for job, opts, direction in JOBS:
            if args.jobs not in job:
                continue
            if job == COW_JOB and key not in ("thinbd", "thinbd-buffered", "overlay"):
                continue
            if job != COW_JOB and key == "overlay":
                continue
            with tempfile.TemporaryDirectory(dir=args.dir) as d:
                t = Targets(d, args.size, only)
                try:
                    if key == "raw":
                        target = dict(engine="file", file=t.image("raw.img"))
                    elif key == "raw-huge":
                        target = dict(engine="file", file=t.image("raw.img"), iomem=f"mmaphuge:{huge.file()}")
                    elif key == "thinbd":
                        target = t.thinbd(cow=(job == COW_JOB))
                    elif key == "thinbd-buffered":
                        target = t.thinbd(cow=(job == COW_JOB), extra=["--buffered-io"])
                    elif key == "nbdkit":
                        target = t.nbdkit(t.image("raw.img"))
                    elif key == "nbdkit-memory":
                        target = t.nbdkit_memory()
                    elif key == "ceiling":
                        target = t.ceiling(t.image("raw.img"))
                    elif key == "nbd-server":
                        target = t.nbd_server(t.image("raw.img"))
                    elif key == "qemu-raw":
                        target = t.qemu_nbd(t.image("raw.img"), "raw")
                    elif key == "qemu-qcow2":
                        target = t.qemu_nbd(t.image("disk.qcow2", "qcow2"), "qcow2")
                    else:
                        base = t.image("base.qcow2", "qcow2")
                        fill = t.qemu_nbd(base, "qcow2")
                        prefill(fill, args.size)
                        t.stop_all()
                        target = t.qemu_nbd(t.image("overlay.qcow2", backing=base), "qcow2")
                    if not job.endswith(FRESH) and job != COW_JOB and key != "overlay":
                        prefill(target, args.size)
                    pids = [p.pid for p in t.procs]
                    before = cpu_seconds(pids) if pids else None
                    busy = machine_busy()
                    out = fio(target, opts, args.runtime, args.size)
                    busy = machine_busy() - busy
                    r = out[direction]
                    p99 = r["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1000
                    # Server CPU per 1,000 requests (fio's ramp second included on both sides).
                    ios = r["total_ios"] * (args.runtime + 1) / args.runtime if r["total_ios"] else 0
                    cpu = (cpu_seconds(pids) - before) * 1e6 / ios if before is not None and ios else None
                    # With --fsync: the FLUSH's own p99 too (a durable write is the write and its sync).
                    sync = out.get("sync", {}).get("lat_ns", {}).get("percentile", {}).get("99.000000")
                    sync99 = sync / 1000 if opts.get("fsync") and sync else None
                    machine = busy * 1e6 / ios if ios else None
                    results[(job, key)] = (r["iops"], r["bw_bytes"] / 1e6, p99, cpu, sync99, machine)
                    fsync = f" fsync p99 {sync99:.0f} us" if sync99 else ""
                    print(f"{name:28} {job:40} {r['iops']:10.0f} IOPS {r['bw_bytes']/1e6:8.1f} MB/s p99 {p99:8.0f} us{fsync}", file=sys.stderr)
                except subprocess.CalledProcessError as e:
                    print(f"{name}: {job}: failed: {e.stderr[-500:]}", file=sys.stderr)
                finally:
                    t.stop_all()
    # Tables.
    cols = [(k, n) for k, n in zip(keys, names) if (not only and k not in opt_in) or k in only]
    jobs = [(job, opts) for job, opts, _ in JOBS if args.jobs in job]
    big = lambda opts: opts["bs"] in ("128k", "1M")
    print(f"\nfio {os.popen('fio --version').read().strip()}, size {args.size}, {args.runtime} s per job, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}\n")
    print("| job | " + " | ".join(n for _, n in cols) + " | thinbd / raw | thinbd / raw, huge pages |")
    print("|---|" + "---|" * (len(cols) + 2))
    for job, opts in jobs:
        cells = []
        for k, _ in cols:
            v = results.get((job, k))
            fsync = f" + FLUSH {v[4]:.0f}" if v and v[4] else ""
            cells.append("–" if not v else (f"{v[1]:.0f} MB/s, p99 {v[2]:.0f} µs" if big(opts) else f"{v[0]/1000:.1f}k, p99 {v[2]:.0f}{fsync} µs"))
        ratio = lambda a, b: f"{a[0]/b[0]:.2f}×" if a and b and b[0] else "–"
        t = results.get((job, "thinbd"))
        print(f"| {job} | " + " | ".join(cells) + f" | {ratio(t, results.get((job, 'raw')))} | {ratio(t, results.get((job, 'raw-huge')))} |")
    print("\n(IOPS in thousands unless MB/s; prefilled targets unless the job says fresh; the COW row compares thinbd after a snapshot with a qcow2 overlay; "
          "`+ FLUSH`: the p99 of the fsync after each write.)")
    peers = [(k, n) for k, n in cols if k != "thinbd"]
    if (job_t := [j for j, _ in jobs if results.get((j, "thinbd"))]) and peers:
        print("\nthinbd ÷ each target (above 1: thinbd is ahead):\n")
        print("| job | " + " | ".join(n for _, n in peers) + " |")
        print("|---|" + "---|" * len(peers))
        for job in job_t:
            t = results[(job, "thinbd")]
            cells = [f"{t[0]/results[(job, k)][0]:.2f}×" if results.get((job, k)) and results[(job, k)][0] else "–" for k, _ in peers]
            print(f"| {job} | " + " | ".join(cells) + " |")
    def per_job(title, targets, field, fmt):
        """A table of one result field per job and target."""
        print(f"\n{title}\n")
        print("| job | " + " | ".join(n for _, n in targets) + " |")
        print("|---|" + "---|" * len(targets))
        for job, _ in jobs:
            cells = [fmt.format(v[field]) if (v := results.get((job, k))) and v[field] is not None else "–" for k, _ in targets]
            print(f"| {job} | " + " | ".join(cells) + " |")

    servers = [(k, n) for k, n in cols if k not in ("raw", "raw-huge", "nbd-server")]
    if servers:
        per_job("Server CPU per 1,000 requests (ms; user + system, whole process):", servers, 3, "{:.1f}")
    # What bounds a ratio to the raw file: every request costs fio, the kernel (TCP both ways,
    # the disk) and the server CPU time, and this machine has os.cpu_count() CPUs in all.
    per_job("Machine CPU per request (µs; busy time of every CPU: fio, the kernel, the server):", cols, 5, "{:.1f}")
    if (not only or "thinbd" in only) and not args.jobs:
        footprint(args.dir, args.size)


if __name__ == "__main__":
    main()
