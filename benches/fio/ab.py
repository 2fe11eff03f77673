#!/usr/bin/env python3
"""Two or more thinbd builds against each other: one fio job, the builds in turn, several
alternating rounds, so that the disk's drift over minutes falls on every build alike.

Usage: benches/fio/ab.py [--rounds N] [--runtime S] [--rw RW] [--bs BS] [--iodepth N] [--fsync]
                         [--fresh] [--settle S] [--dir DIR] BIN [BIN...]

Without --fresh every build serves the same pool in turn (one 1 GiB volume, prefilled once):
where two pool files lie on the disk moves 4k results by up to 10%, so builds share one. List
the oldest build first: it creates the pool, and a build cannot open a pool of a newer format.
With --fresh each build keeps a pool of its own (made by itself, so its own pool format) and
writes into a new volume every round: first writes. Nothing is deleted between rounds: on this
machine's disk, deleting files slows it for minutes (benches/README, "The disk slows after
files are deleted"). Delete --dir yourself afterwards.

Prints per run: IOPS, completion p50 and p99, the FLUSH's p99 with --fsync, thinbd's CPU per
request, and how many durable metadata commits (journal checkpoints, admin operations) it made.
"""
import argparse, json, os, re, subprocess, sys, time, urllib.request

from stages import cpu_seconds, port


def durable_commits(metrics):
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics").read().decode()
    m = re.search(r'thinbd_meta_commit_duration_seconds_count\{durable="true"\} (\S+)', text)
    return float(m.group(1)) if m else 0.0


class Server:
    """`thinbd serve` of one build on one data dir, up until stopped."""

    def __init__(self, binary, data_dir):
        self.bin, self.nbd, self.api, self.metrics = binary, port(), port(), port()
        log = open(os.path.join(os.path.dirname(data_dir), "serve.log"), "a")
        self.proc = subprocess.Popen(
            [binary, "serve", "--data-dir", data_dir, "--capacity", str(16 << 30),
             "--nbd-listen", f"127.0.0.1:{self.nbd}", "--api-listen", f"127.0.0.1:{self.api}",
             "--metrics-listen", f"127.0.0.1:{self.metrics}"],
            stdout=subprocess.DEVNULL, stderr=log)
        for _ in range(100):
            if self.proc.poll() is not None:
                sys.exit(f"{binary} did not start on {data_dir}; see {log.name}")
            if self.volume("list", check=False).returncode == 0:
                return
            time.sleep(0.1)
        sys.exit(f"{binary} did not answer on its API port")

    def volume(self, *args, check=True):
        return subprocess.run([self.bin, "volume", "--api", f"127.0.0.1:{self.api}", *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=check)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def fio(uri, a):
    args = ["fio", "--name=j", "--size=1G", f"--rw={a.rw}", f"--bs={a.bs}", f"--iodepth={a.iodepth}",
            f"--runtime={a.runtime}", "--time_based", "--randrepeat=0", "--norandommap", "--ioengine=nbd",
            f"--uri={uri}", "--output-format=json"]
    if a.fsync:
        args.append("--fsync=1")
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]


def pct(side, p):
    lat = side["clat_ns"] if "percentile" in side.get("clat_ns", {}) else side["lat_ns"]
    return lat["percentile"][p] / 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bins", nargs="+", metavar="BIN")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--rw", default="randwrite")
    ap.add_argument("--bs", default="4k")
    ap.add_argument("--iodepth", type=int, default=32)
    ap.add_argument("--fsync", action="store_true", help="a FLUSH after every write (fio --fsync=1)")
    ap.add_argument("--fresh", action="store_true", help="first writes: a new volume per round")
    ap.add_argument("--settle", type=float, default=5, help="seconds between runs")
    ap.add_argument("--dir", default="/var/tmp/thinbd-ab")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    shared = os.path.join(a.dir, "shared")
    if not a.fresh and not os.path.exists(shared):
        s = Server(a.bins[0], shared)
        try:
            s.volume("create", "v", "--size", "1GiB")
            subprocess.run(["fio", "--name=prefill", "--size=1G", "--rw=write", "--bs=1M", "--iodepth=8",
                            "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{s.nbd}/v"], check=True,
                           stdout=subprocess.DEVNULL)
        finally:
            s.stop()
    run = int(time.time())
    print(f"{a.rw} {a.bs} QD{a.iodepth}{' + fsync' if a.fsync else ''}{' fresh' if a.fresh else ''}, "
          f"{a.runtime} s, {a.rounds} rounds")
    for r in range(a.rounds):
        for i, b in enumerate(a.bins):
            s = Server(b, os.path.join(a.dir, f"build{i}") if a.fresh else shared)
            try:
                name = f"f{run}r{r}" if a.fresh else "v"
                if a.fresh:
                    s.volume("create", name, "--size", "1GiB")
                d0, c0 = durable_commits(s.metrics), cpu_seconds(s.proc.pid)
                job = fio(f"nbd://127.0.0.1:{s.nbd}/{name}", a)
                d1, c1 = durable_commits(s.metrics), cpu_seconds(s.proc.pid)
            finally:
                s.stop()
            side = job["read"] if job["read"]["total_ios"] else job["write"]
            iops = side["iops"]
            line = f"{i} {b[-28:]:28s} {iops:8.0f} IOPS  p50 {pct(side, '50.000000'):5.0f}  p99 {pct(side, '99.000000'):6.0f} us"
            if a.fsync:
                line += f"  FLUSH p99 {pct(job['sync'], '99.000000'):6.0f} us"
            line += f"  CPU {1e6 * (c1 - c0) / max(side['total_ios'], 1):5.1f} us/req  durable commits {d1 - d0:.0f}"
            print(line, flush=True)
            time.sleep(a.settle)


if __name__ == "__main__":
    main()
