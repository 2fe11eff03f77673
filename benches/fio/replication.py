"""Replication on a namespace cluster (run through `harness.py --replication`).

Three thinbd nodes and etcd, each in its own network namespace on one bridge (10.77.0.1-4),
fio in node-1's namespace through its nbd engine; every volume is attached through node-1
(its target, which holds a copy). Measures, in one run:
- 1, 2 and 3 copies side by side (the same jobs, each volume prefilled);
- a full rebuild (dense, and 4k data / 4k hole) against nbdcopy of the same volume over the
  same link;
- what a delta rebuild transfers against the data changed while the copy was away;
- failover (target killed to the first acknowledged write through another node) and the
  stall when a copy is lost under a QD1 writer.
"""
import json, os, re, signal, subprocess, sys, tempfile, time

import harness as h

PREFIX = "tbr"
BIN = os.path.join(h.ROOT, "target", "release", "thinbd")

REPL_JOBS = [
    ("4k randwrite QD32", dict(rw="randwrite", bs="4k", iodepth=32, numjobs=1), "write"),
    ("4k randwrite QD1", dict(rw="randwrite", bs="4k", iodepth=1, numjobs=1), "write"),
    ("4k randread QD32", dict(rw="randread", bs="4k", iodepth=32, numjobs=1), "read"),
    ("1M seq write QD8", dict(rw="write", bs="1M", iodepth=8, numjobs=1), "write"),
]


def ip(i):
    return f"10.77.0.{i}"


def ns(i):
    return f"{PREFIX}-{i}"


def nsx(i, *cmd):
    return ["ip", "netns", "exec", ns(i), *cmd]


def run(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def down():
    out = subprocess.run(["ip", "netns", "list"], stdout=subprocess.PIPE, text=True).stdout
    for name in [l.split()[0] for l in out.splitlines() if l.startswith(PREFIX + "-")]:
        pids = subprocess.run(["ip", "netns", "pids", name], stdout=subprocess.PIPE, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
        subprocess.run(["ip", "netns", "del", name])


def up(n):
    """A bridge in its own namespace and n node namespaces on it (10.77.0.1..n)."""
    down()
    sw = f"{PREFIX}-sw"
    run("ip", "netns", "add", sw)
    run("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
    run("ip", "-n", sw, "link", "set", "br0", "up")
    for i in range(1, n + 1):
        run("ip", "netns", "add", ns(i))
        run("ip", "link", "add", f"{PREFIX}h{i}", "type", "veth", "peer", "name", f"{PREFIX}b{i}")
        run("ip", "link", "set", f"{PREFIX}h{i}", "netns", ns(i))
        run("ip", "link", "set", f"{PREFIX}b{i}", "netns", sw)
        run("ip", "-n", sw, "link", "set", f"{PREFIX}b{i}", "master", "br0", "up")
        run("ip", "-n", ns(i), "link", "set", f"{PREFIX}h{i}", "name", "eth0")
        run("ip", "-n", ns(i), "addr", "add", f"{ip(i)}/24", "dev", "eth0")
        run("ip", "-n", ns(i), "link", "set", "eth0", "up")
        run("ip", "-n", ns(i), "link", "set", "lo", "up")


class Cluster:
    def __init__(self, d, capacity):
        self.d, self.capacity, self.nodes = d, capacity, {}
        etcd = f"http://{ip(4)}:2379"
        self.etcd = subprocess.Popen(
            nsx(4, "etcd", "--name", "e", "--data-dir", os.path.join(d, "etcd"),
                "--listen-client-urls", etcd, "--advertise-client-urls", etcd,
                "--listen-peer-urls", f"http://{ip(4)}:2380", "--initial-advertise-peer-urls", f"http://{ip(4)}:2380",
                "--initial-cluster", f"e=http://{ip(4)}:2380"),
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "etcd.log"), "w"))
        probe = f"import socket; socket.create_connection(('{ip(4)}', 2379), timeout=1).close()"
        for _ in range(100):
            if subprocess.run(nsx(1, "python3", "-c", probe), stderr=subprocess.DEVNULL).returncode == 0:
                break
            time.sleep(0.1)
        for i in (1, 2, 3):
            self.start(i)
        for _ in range(200):
            try:
                if len(json.loads(self.cli(1, "node", "list", "-o", "json"))["nodes"]) == 3:
                    return
            except subprocess.CalledProcessError:
                pass
            time.sleep(0.1)
        sys.exit("the cluster did not come up")

    def start(self, i):
        args = nsx(i, BIN, "serve", "--data-dir", os.path.join(self.d, f"node-{i}"), "--capacity", str(self.capacity),
                   "--nbd-listen", f"{ip(i)}:10809", "--api-listen", f"{ip(i)}:10810",
                   "--metrics-listen", f"{ip(i)}:10811", "--etcd", f"http://{ip(4)}:2379",
                   "--node-name", f"node-{i}", "--node-lease-ttl", "3", "--rebuild-rate", "0")
        log = open(os.path.join(self.d, f"node-{i}.log"), "a")
        self.nodes[i] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log,
                                         env=dict(os.environ, RUST_LOG="info"))
        for _ in range(300):
            try:
                self.cli(i, "pool")
                return
            except subprocess.CalledProcessError:
                time.sleep(0.05)
        sys.exit(f"node-{i} did not start")

    def kill(self, i):
        self.nodes[i].kill()
        self.nodes[i].wait()

    def log(self, i):
        return open(os.path.join(self.d, f"node-{i}.log")).read()

    def cli(self, i, *args):
        return h.sh(*nsx(i, BIN, *args, "--api", f"{ip(i)}:10810"))

    def volume(self, name, copies, size, on=None):
        nodes = [a for n in (on or range(1, copies + 1)) for a in ("--node", f"node-{n}")]
        self.cli(1, "volume", "create", name, "--size", str(size), "--replicas", str(copies), *nodes)
        grant = json.loads(self.cli(1, "volume", "publish", name, "--node", "app", "--single-writer", "-o", "json"))
        return grant["export_name"].replace("#", "%23")

    def show(self, name):
        return json.loads(self.cli(1, "volume", "show", name, "-o", "json"))

    def wait_in_sync(self, name, n, timeout=600):
        deadline = time.time() + timeout
        while len(self.show(name).get("in_sync", [])) < n:
            if time.time() > deadline:
                sys.exit(f"{name}: {n} copies not in sync after {timeout} s: {self.show(name)}")
            time.sleep(0.05)

    def stop(self):
        for p in list(self.nodes.values()) + [self.etcd]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in list(self.nodes.values()) + [self.etcd]:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def uri(i, export):
    return f"nbd://{ip(i)}:10809/{export}"


def fio(export, opts, runtime, size, extra=()):
    args = nsx(1, "fio", "--name=job", "--output-format=json", "--group_reporting", f"--size={size}",
               "--ioengine=nbd", f"--uri={uri(1, export)}", *extra)
    if runtime:
        args += ["--time_based", f"--runtime={runtime}", "--ramp_time=1", "--randrepeat=0", "--norandommap"]
    args += [f"--{k}={v}" for k, v in opts.items()]
    out = h.sh(*args)
    return json.loads(out[out.index("{"):])["jobs"][0]


def prefill(export, size, pattern="write"):
    """Written through (and flushed: a copy that leaves later need not be sent unflushed data)."""
    fio(export, dict(rw=pattern, bs="4k" if ":" in pattern else "1M", iodepth=8, end_fsync=1), 0, size)


def keep_attached(export):
    """A session on node-1 for the volume (its target rebuilds only volumes in use): a
    trickle of reads, stopped by the caller."""
    return subprocess.Popen(nsx(1, "fio", "--name=keep", "--ioengine=nbd", f"--uri={uri(1, export)}", "--rw=randread",
                                "--bs=4k", "--rate_iops=2", "--time_based", "--runtime=3600", "--size=1M"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def rtt_us():
    """Median TCP round trip node-1 → node-2 (one byte each way), Python on both ends."""
    server = subprocess.Popen(nsx(2, "python3", "-c", (
        "import socket\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        f"s.bind(('{ip(2)}',7777));s.listen(1);c,_=s.accept();c.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)\n"
        "while True:\n  b=c.recv(1)\n  if not b: break\n  c.sendall(b)")))
    time.sleep(0.3)
    out = h.sh(*nsx(1, "python3", "-c", (
        "import socket,time\nc=socket.create_connection(('" + ip(2) + "',7777));"
        "c.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)\nt=[]\n"
        "for _ in range(2000):\n  a=time.perf_counter_ns();c.sendall(b'x');c.recv(1);t.append(time.perf_counter_ns()-a)\n"
        "t.sort();print(t[len(t)//2]/1000)")))
    server.wait(timeout=5)
    return float(out.strip())


def rebuilt_copied(c, volume):
    """Bytes the last rebuild of `volume` wrote (its target's log line)."""
    uuid = c.show(volume)["uuid"]
    lines = [l for l in c.log(1).splitlines() if "copy rebuilt and back in sync" in l and (volume in l or uuid in l)]
    m = re.search(r"copied=(\d+)", lines[-1]) if lines else None
    return int(m.group(1)) if m else 0


def full_rebuild(c, name, size, pattern):
    """Seconds to rebuild a third copy of a volume of 2, filled by `pattern`; its allocated bytes."""
    export = c.volume(name, 2, size)
    prefill(export, size, pattern)
    # Timed from the request: the target may rebuild within it (its last session's links),
    # or when the volume is attached again.
    t0 = time.time()
    c.cli(1, "volume", "set-replicas", name, "3")
    keep = keep_attached(export)
    try:
        c.wait_in_sync(name, 3)
    finally:
        keep.kill()
    return time.time() - t0, c.show(name)["allocated_bytes"], export


def replication(root_dir, size, runtime):
    for tool in ("etcd", "fio", "nbdcopy"):
        if not h.shutil.which(tool):
            sys.exit(f"{tool} is missing: run scripts/setup")
    size_b = h.Targets(root_dir, size, set()).size_bytes()
    up(4)
    d = tempfile.mkdtemp(dir=root_dir)
    c = None
    try:
        c = Cluster(d, size_b * 12)
        rtt = rtt_us()
        # 1, 2, 3 copies.
        exports = {n: c.volume(f"r{n}", n, size_b) for n in (1, 2, 3)}
        for e in exports.values():
            prefill(e, size)
        rows = []
        for job, opts, direction in REPL_JOBS:
            got = {}
            for n, e in exports.items():
                r = fio(e, opts, runtime, size)[direction]
                pct = r["clat_ns"].get("percentile", {})
                got[n] = (r["iops"], r["bw_bytes"] / 1e6, pct.get("50.000000", 0) / 1000, pct.get("99.000000", 0) / 1000)
                print(f"{job:20} {n} copies {got[n][0]:9.0f} IOPS {got[n][1]:8.1f} MB/s p50 {got[n][2]:6.0f} us "
                      f"p99 {got[n][3]:6.0f} us", file=sys.stderr)
            rows.append((job, opts, got))
        # Rebuilds.
        dense_s, dense_b, dense_export = full_rebuild(c, "fd", size_b, "write")
        print(f"full rebuild dense: {dense_b} bytes in {dense_s:.2f} s", file=sys.stderr)
        sparse_s, sparse_b, _ = full_rebuild(c, "fs", size_b, "write:4k")
        print(f"full rebuild 4k/4k: {sparse_b} allocated bytes in {sparse_s:.2f} s", file=sys.stderr)
        nc = c.volume("nc", 1, size_b, on=[3])
        t0 = time.time()
        h.sh(*nsx(1, "nbdcopy", "--flush", uri(1, dense_export), uri(3, nc)))
        copy_s = time.time() - t0
        print(f"nbdcopy of the dense volume to node-3: {copy_s:.2f} s", file=sys.stderr)
        # Delta rebuilds: node-3 away while a known amount of data changes.
        deltas = []
        for name, bs, changed in (("d64", "64k", 64 << 20), ("d4", "4k", 16 << 20)):
            export = c.volume(name, 3, size_b)
            prefill(export, size)
            keep = keep_attached(export)
            try:
                c.kill(3)
                # randommap (no --norandommap): each block once, so `changed` bytes differ.
                fio(export, dict(rw="randwrite", bs=bs, iodepth=8, io_size=changed, end_fsync=1), 0, size)
                c.start(3)
                c.wait_in_sync(name, 3)
            finally:
                keep.kill()
            deltas.append((bs, changed, rebuilt_copied(c, name)))
            print(f"delta rebuild after {changed} bytes of {bs} writes: copied {deltas[-1][2]}", file=sys.stderr)
        # A copy lost under a QD1 writer: the longest write.
        export = c.volume("st", 3, size_b)
        prefill(export, size)
        writer = subprocess.Popen(nsx(1, "fio", "--name=job", "--output-format=json", f"--size={size}", "--ioengine=nbd",
                                      f"--uri={uri(1, export)}", "--rw=randwrite", "--bs=4k", "--iodepth=1",
                                      "--time_based", "--runtime=6"), stdout=subprocess.PIPE, text=True)
        time.sleep(2)
        c.kill(3)
        out = writer.communicate()[0]
        w = json.loads(out[out.index("{"):])["jobs"][0]["write"]
        stall_ms = w["clat_ns"]["max"] / 1e6
        c.start(3)
        print(f"copy lost under a QD1 writer: longest write {stall_ms:.1f} ms", file=sys.stderr)
        # Failover: the target killed; the first write acknowledged through node-2. Right after
        # the whole volume was written (the new target reconciles every region the activity
        # record lists), and after the volume sat idle (the record is empty by then).
        block = os.path.join(d, "4k")
        with open(block, "wb") as f:
            f.write(os.urandom(4096))
        failovers = []
        for idle in (0, 8):
            export = c.volume(f"fo{idle}", 3, size_b)
            prefill(export, size)
            time.sleep(idle)
            c.kill(1)
            t0 = time.time()
            while subprocess.run(nsx(2, "nbdcopy", "--flush", block, uri(2, export)), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL).returncode != 0:
                if time.time() - t0 > 120:
                    sys.exit("no write was acknowledged through node-2 after the target was killed")
                time.sleep(0.01)
            failovers.append(time.time() - t0)
            c.start(1)
        failover_s, failover_idle_s = failovers
        print(f"failover: {failover_s:.2f} s, idle {failover_idle_s:.2f} s", file=sys.stderr)

        print(f"\nreplication: three thinbd nodes and etcd in network namespaces on one bridge (veth), fio "
              f"{os.popen('fio --version').read().strip()} nbd engine in node-1's namespace, every volume attached "
              f"through node-1 (which holds a copy), size {size}, {runtime} s per job, {os.cpu_count()} CPUs, "
              f"{time.strftime('%Y-%m-%d')}; TCP round trip node-1 → node-2 (median, Python) {rtt:.0f} µs\n")
        print("| job | 1 copy | 2 copies | 3 copies | 2 / 1 | 3 / 2 |")
        print("|---|---|---|---|---|---|")
        for job, opts, got in rows:
            big = opts["bs"] == "1M"
            cell = lambda v: f"{v[1]:.0f} MB/s, p50 {v[2]:.0f} µs" if big else f"{v[0]/1000:.1f}k, p50 {v[2]:.0f} µs"
            print(f"| {job} | {cell(got[1])} | {cell(got[2])} | {cell(got[3])} | {got[2][0]/got[1][0]:.2f}× "
                  f"| {got[3][0]/got[2][0]:.2f}× |")
        qd1 = next(g for j, _, g in rows if j == "4k randwrite QD1")
        print(f"\nQD1 write p50: 1 copy {qd1[1][2]:.0f} µs, 2 copies {qd1[2][2]:.0f} µs (budget: 1 copy + round trip "
              f"+ 50 µs = {qd1[1][2] + rtt + 50:.0f} µs), 3 copies {qd1[3][2]:.0f} µs "
              f"({qd1[3][2] / qd1[2][2]:.2f}× 2 copies)\n")
        print("| rebuild | bytes | seconds | MB/s | vs nbdcopy of the same volume |")
        print("|---|---|---|---|---|")
        print(f"| full, dense | {dense_b} | {dense_s:.2f} | {dense_b/dense_s/1e6:.0f} | "
              f"{(dense_b/dense_s)/(dense_b/copy_s):.2f}× (nbdcopy {copy_s:.2f} s) |")
        print(f"| full, 4k data / 4k hole | {sparse_b} allocated, {size_b//2} data | {sparse_s:.2f} | "
              f"{sparse_b/sparse_s/1e6:.0f} | per data byte {(sparse_s/(size_b/2))/(dense_s/dense_b):.2f}×, per allocated byte "
              f"{(sparse_s/sparse_b)/(dense_s/dense_b):.2f}× the time of dense |")
        for bs, changed, copied in deltas:
            print(f"| delta after {changed >> 20} MiB of random {bs} writes | {copied} copied | – | – | "
                  f"{copied/changed:.2f}× the data changed |")
        print(f"\nfailover (target killed → first write acknowledged through another node): {failover_s:.2f} s right "
              f"after the whole volume was written (the new target compares every region written in the last 5 s), "
              f"{failover_idle_s:.2f} s after 8 s idle; "
              f"a copy killed under a QD1 writer: longest write {stall_ms:.1f} ms")
    finally:
        if c:
            c.stop()
        down()
        h.shutil.rmtree(d, ignore_errors=True)
