#!/usr/bin/env python3
"""Where a request's time goes in thinbd: one fio job (nbd engine, 4 KiB) against a prefilled
1 GiB volume of a `thinbd serve --stage-latency`, then the mean time per stage from the
metrics page (`thinbd_stage_seconds`) and thinbd's CPU per request.

Usage: benches/fio/stages.py [randread|randwrite|read|write] [QUEUE_DEPTH] [-- serve args...]
Needs a release build (or THINBD_BIN, to compare builds) and fio. BS=128k sets the block size; FSYNC=1 sends a FLUSH after every
write (fio's --fsync); JOBS=2 runs two fio jobs (two connections); FRESH=1 skips the prefill (first writes). PERF=1 also records `perf record -g` of thinbd to /tmp/perf.data
(PERF=1 PERFSTAT=event,event...: `perf stat` of those events to /tmp/perfstat.txt instead).
"""
import json, os, re, socket, subprocess, sys, tempfile, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("THINBD_BIN") or os.path.join(ROOT, "target", "release", "thinbd")
STAGES = ["admit", "schedule", "execute", "ring_queue", "ring_disk", "ring_wake", "reply"]


def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stages(metrics):
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics").read().decode()
    out = {}
    for m in re.finditer(r'thinbd_stage_seconds_(sum|count)\{stage="(\w+)"\} (\S+)', text):
        out.setdefault(m.group(2), {})[m.group(1)] = float(m.group(3))
    return out


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    args = sys.argv[1:]
    extra = args[args.index("--") + 1:] if "--" in args else []
    args = args[:args.index("--")] if "--" in args else args
    job = args[0] if args else "randread"
    qd = args[1] if len(args) > 1 else "32"
    nbd, api, metrics = port(), port(), port()
    d = tempfile.mkdtemp(dir="/var/tmp")
    server = subprocess.Popen(
        [BIN, "serve", "--data-dir", d, "--capacity", str(4 << 30), "--nbd-listen", f"127.0.0.1:{nbd}",
         "--api-listen", f"127.0.0.1:{api}", "--metrics-listen", f"127.0.0.1:{metrics}", "--stage-latency", *extra],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "log"), "w"))
    try:
        time.sleep(1)
        subprocess.run([BIN, "volume", "--api", f"127.0.0.1:{api}", "create", "v", "--size", "1GiB"], check=True,
                       stdout=subprocess.DEVNULL)
        uri = f"nbd://127.0.0.1:{nbd}/v"
        if not os.environ.get("FRESH"):
            subprocess.run(["fio", "--name=prefill", "--size=1G", "--rw=write", "--bs=1M", "--iodepth=8",
                            "--ioengine=nbd", f"--uri={uri}"], check=True, stdout=subprocess.DEVNULL)
        before, c0, t0 = stages(metrics), cpu_seconds(server.pid), time.time()
        perf = None
        if os.environ.get("PERF"):
            what = (["stat", "-e", os.environ["PERFSTAT"], "-o", "/tmp/perfstat.txt"] if os.environ.get("PERFSTAT")
                    else ["record", "-F", "1999", "-g", "-o", "/tmp/perf.data"])
            perf = subprocess.Popen(["perf", *what, "-p", str(server.pid), "--", "sleep", "4"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = subprocess.run(["fio", "--name=j", "--size=1G", f"--rw={job}", f"--bs={os.environ.get('BS', '4k')}", f"--iodepth={qd}", "--runtime=5",
                            "--time_based", "--randrepeat=0", "--norandommap", "--ioengine=nbd", f"--uri={uri}", "--output-format=json",
                            f"--fsync={os.environ.get('FSYNC', '0')}", f"--numjobs={os.environ.get('JOBS', '1')}",
                            "--group_reporting"],
                           check=True, capture_output=True, text=True)
        after, c1, t1 = stages(metrics), cpu_seconds(server.pid), time.time()
        if perf:
            perf.wait()
        result = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
        side = result["read"] if "read" in job else result["write"]
        iops = side["iops"]
        p50 = side["clat_ns"]["percentile"]["50.000000"] / 1000
        p99 = side["clat_ns"]["percentile"]["99.000000"] / 1000
        busy = (c1 - c0) / (t1 - t0)
        print(f"{job} QD{qd}: {iops:.0f} IOPS, p50 {p50:.0f} us, p99 {p99:.0f} us; thinbd CPU {100 * busy:.0f}% "
              f"= {1e6 * busy / iops:.1f} us per request")
        for s in STAGES:
            n = after.get(s, {}).get("count", 0) - before.get(s, {}).get("count", 0)
            if n:
                mean = 1e6 * (after[s]["sum"] - before.get(s, {}).get("sum", 0)) / n
                print(f"  {s:11s} {mean:8.1f} us mean, {n} times")
    finally:
        server.terminate()
        server.wait()
        subprocess.run(["rm", "-rf", d])


if __name__ == "__main__":
    main()
