#!/usr/bin/python3
"""NBD benchmark: rpointd against the anchors, on one backing file, in one go.

Servers (each on a Unix socket in a private temp dir, all on the same file):
  limit             fio io_uring O_DIRECT on the raw file: what the storage allows
  qemu-nbd          --cache=none --aio=io_uring
  nbdkit-file       nbdkit's file plugin (page cache)
  nbdkit-file-direct  nbdkit's file plugin with cache=none
  qsd               qemu-storage-daemon: file node cache.direct=on aio=io_uring, NBD export
  ceiling           nbdkit null + noextents: no storage at all; what client, socket
                    and CPUs allow (a server cannot beat it on this harness)
  rpointd-direct    rpointd with `io: direct: true` (adopting the file over the API)
  rpointd-buffered  rpointd with `io: direct: false`

Jobs (fio's nbd engine, one connection; the page cache is dropped before each):
  randread-4k  4k random read, QD32       (IOPS)
  randwrite-4k 4k random write, QD32      (IOPS)
  read-1m      1M sequential read, QD8    (MiB/s)
  write-1m     1M sequential write, QD8   (MiB/s)
  nbdcopy      nbdcopy of the whole export to null: (MiB/s; for the limit: fio
               O_DIRECT 256k sequential read at QD64, like nbdcopy's defaults)

Prints the results and each server's ratio to the limit, the ceiling and qemu-nbd
as Markdown (also written to --out) ready to paste into bench/RESULTS.md.
Must run as root (drop_caches). Not a test: run it by hand on a quiet machine.

  bench/nbd-bench.py                  # full run: 2 GiB file, 15 s per job
  bench/nbd-bench.py --quick          # smoke run: 256 MiB, 2 s per job
  bench/nbd-bench.py --servers limit,ceiling,rpointd-direct --jobs randread-4k
"""
import argparse
import atexit
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

SERVERS = ["limit", "qemu-nbd", "nbdkit-file", "nbdkit-file-direct", "qsd", "ceiling",
           "rpointd-direct", "rpointd-buffered"]
JOBS = {
    # name: (fio rw, block size, iodepth, unit)
    "randread-4k": ("randread", "4k", 32, "IOPS"),
    "randwrite-4k": ("randwrite", "4k", 32, "IOPS"),
    "read-1m": ("read", "1m", 8, "MiB/s"),
    "write-1m": ("write", "1m", 8, "MiB/s"),
    "nbdcopy": (None, None, None, "MiB/s"),
}
EXPORT = "disk"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class Bench:
    def __init__(self, args):
        self.a = args
        self.procs = []          # every process we started, killed at exit
        self.tmp = None
        self.results = {}        # server -> job -> value
        self.notes = {}          # server -> command line / remarks
        self.failures = []

    # ---------------------------------------------------------------- setup

    def setup(self):
        base = self.a.dir
        os.makedirs(base, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix="nbd-bench.", dir=base)
        self.file = os.path.join(self.tmp, "backing.img")
        self.sock = os.path.join(self.tmp, "nbd.sock")
        size = self.a.size
        log(f"filling {self.file} with {size >> 20} MiB of random data ...")
        # Real data everywhere: fallocate'd or sparse space reads as zeroes without
        # touching the disk, and nbdcopy skips holes.
        mib = size >> 20
        subprocess.run(["dd", "if=/dev/urandom", f"of={self.file}", "bs=1M", f"count={mib}",
                        "iflag=fullblock", "oflag=direct", "status=none"], check=True)
        os.sync()

    def cleanup(self):
        for p in reversed(self.procs):
            self._kill(p)
        self.procs.clear()
        if self.tmp and not self.a.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def _kill(self, p, timeout=15):
        if p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()

    def drop_caches(self):
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError as e:
            sys.exit(f"cannot drop the page cache ({e}); run as root")

    # ---------------------------------------------------------------- servers

    def _spawn(self, argv, logname):
        logf = open(os.path.join(self.tmp, logname), "ab")
        p = subprocess.Popen(argv, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL,
                             start_new_session=True)  # own process group: killpg gets all
        logf.close()
        self.procs.append(p)
        return p

    def _log_tail(self, logname):
        try:
            with open(os.path.join(self.tmp, logname), errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def _wait_nbd(self, p, uri, logname, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if p.poll() is not None:
                raise RuntimeError(f"server exited {p.returncode}:\n{self._log_tail(logname)}")
            r = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True)
            if r.returncode == 0:
                return int(r.stdout.strip())
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self._log_tail(logname)}")

    def start_server(self, name):
        """Starts `name`; returns (process, NBD URI)."""
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        uri = f"nbd+unix:///{EXPORT}?socket={self.sock}"
        f, s, size = self.file, self.sock, self.a.size
        if name == "qemu-nbd":
            argv = ["qemu-nbd", "--format=raw", "--cache=none", "--aio=io_uring", "--persistent",
                    "--shared=0", f"--socket={s}", f"--export-name={EXPORT}", f]
        elif name == "nbdkit-file":
            argv = ["nbdkit", "--foreground", "--unix", s, "file", f"file={f}"]
        elif name == "nbdkit-file-direct":
            argv = ["nbdkit", "--foreground", "--unix", s, "file", f"file={f}", "cache=none"]
        elif name == "qsd":
            argv = ["qemu-storage-daemon",
                    "--blockdev", f"driver=file,node-name=file0,filename={f},cache.direct=on,"
                                  "aio=io_uring",
                    "--nbd-server", f"addr.type=unix,addr.path={s}",
                    "--export", f"type=nbd,id=exp0,node-name=file0,name={EXPORT},writable=on"]
        elif name == "ceiling":
            argv = ["nbdkit", "--foreground", "--unix", s, "--filter=noextents", "null",
                    f"size={size}"]
        elif name.startswith("rpointd-"):
            return self.start_rpointd(name)
        else:
            raise ValueError(name)
        self.notes[name] = " ".join(argv).replace(self.tmp, "$TMP")
        p = self._spawn(argv, f"{name}.log")
        got = self._wait_nbd(p, uri, f"{name}.log")
        if got != size:
            raise RuntimeError(f"{name}: export size {got} != {size}")
        return p, uri

    def start_rpointd(self, name):
        binary = self.a.rpointd
        if not os.access(binary, os.X_OK):
            raise FileNotFoundError(f"{binary} not built (ninja -C build), or pass --rpointd")
        direct = name == "rpointd-direct"
        state = os.path.join(self.tmp, f"{name}-state")
        os.makedirs(state, exist_ok=True)
        cfg = os.path.join(self.tmp, f"{name}.yaml")
        with open(cfg, "w") as c:
            c.write(f"io:\n  direct: {'true' if direct else 'false'}\n")
            # The backing file is adopted: allow its directory (adopt_paths, rpointd(8)).
            c.write(f"adopt_paths: [{json.dumps(os.path.dirname(os.path.realpath(self.file)))}]\n")
        argv = [binary, "--state-dir", state, "--config", cfg, "--log-level", "warn"]
        self.notes[name] = (" ".join(argv).replace(self.tmp, "$TMP")
                            + f"  (config: io.direct={str(direct).lower()}; backing file "
                              "adopted with PUT /disks/disk {\"properties\":{\"path\":FILE}})")
        logname = f"{name}.log"
        p = self._spawn(argv, logname)
        control = os.path.join(state, "control.sock")
        nbd_sock = os.path.join(state, "nbd.sock")
        deadline = time.time() + 60
        while not (os.path.exists(control) and os.path.exists(nbd_sock)):
            if p.poll() is not None:
                raise RuntimeError(f"rpointd exited {p.returncode}:\n{self._log_tail(logname)}")
            if time.time() > deadline:
                raise RuntimeError("rpointd did not create its sockets:\n"
                                   + self._log_tail(logname))
            time.sleep(0.05)
        body = json.dumps({"properties": {"path": self.file}})
        r = subprocess.run(["curl", "-sS", "--fail-with-body", "--unix-socket", control, "-X", "PUT",
                            "-H", "Content-Type: application/json", "--data", body,
                            f"http://localhost/disks/{EXPORT}"],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"adopting the file failed: {r.stdout} {r.stderr}\n"
                               + self._log_tail(logname))
        uri = f"nbd+unix:///{EXPORT}?socket={nbd_sock}"
        got = self._wait_nbd(p, uri, logname)
        if got != self.a.size:
            raise RuntimeError(f"{name}: export size {got} != {self.a.size}")
        return p, uri

    # ---------------------------------------------------------------- jobs

    def fio(self, job, target_args):
        rw, bs, qd, unit = JOBS[job]
        out = os.path.join(self.tmp, "fio.json")
        if os.path.exists(out):
            os.unlink(out)
        argv = ["fio", "--name=" + job, f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}",
                "--time_based", f"--runtime={self.a.runtime}", "--ramp_time=1",
                "--output-format=json", f"--output={out}"] + target_args
        return self._run_fio(argv, out, "read" if "read" in rw else "write", unit)

    def _run_fio(self, argv, out, side, unit):
        r = subprocess.run(argv, capture_output=True, text=True,
                           timeout=self.a.runtime * 4 + 120)
        try:
            with open(out) as f:
                data = json.load(f)
        except (OSError, ValueError):
            raise RuntimeError(f"fio failed ({r.returncode}): {r.stdout[-1500:]} {r.stderr[-1500:]}")
        j = data["jobs"][0]
        if r.returncode != 0 or j.get("error"):
            raise RuntimeError(f"fio error {j.get('error')}: {r.stderr[-1500:]}")
        st = j[side]
        return st["iops"] if unit == "IOPS" else st["bw"] / 1024.0  # bw is KiB/s

    def nbdcopy(self, uri):
        t0 = time.monotonic()
        r = subprocess.run(["nbdcopy", uri, "null:"], capture_output=True, text=True,
                           timeout=3600)
        dt = time.monotonic() - t0
        if r.returncode != 0:
            raise RuntimeError(f"nbdcopy failed: {r.stderr[-1500:]}")
        return (self.a.size / (1 << 20)) / dt

    def run_job(self, server, job, uri):
        self.drop_caches()
        if server == "limit":
            target = ["--ioengine=io_uring", "--direct=1", f"--filename={self.file}"]
            if job == "nbdcopy":
                out = os.path.join(self.tmp, "fio.json")
                if os.path.exists(out):
                    os.unlink(out)
                argv = ["fio", "--name=limit-copy", "--rw=read", "--bs=256k", "--iodepth=64",
                        "--time_based", f"--runtime={self.a.runtime}", "--ramp_time=1",
                        "--output-format=json", f"--output={out}"] + target
                return self._run_fio(argv, out, "read", "MiB/s")
            return self.fio(job, target)
        if job == "nbdcopy":
            return self.nbdcopy(uri)
        return self.fio(job, ["--ioengine=nbd", f"--uri={uri}"])

    # ---------------------------------------------------------------- main

    def run(self):
        self.setup()
        for server in self.a.servers:
            log(f"== {server}")
            self.results[server] = {}
            p = None
            try:
                if server == "limit":
                    self.notes[server] = "fio --ioengine=io_uring --direct=1 --filename=FILE"
                    uri = None
                else:
                    p, uri = self.start_server(server)
                for job in self.a.jobs:
                    try:
                        v = self.run_job(server, job, uri)
                        self.results[server][job] = v
                        log(f"   {job:<13} {v:>10.0f} {JOBS[job][3]}")
                    except (RuntimeError, subprocess.TimeoutExpired) as e:
                        self.failures.append(f"{server} / {job}: {e}")
                        log(f"   {job:<13} FAILED: {e}")
                    if p is not None and p.poll() is not None:
                        raise RuntimeError(f"{server} died during {job} (rc={p.returncode}):\n"
                                           + self._log_tail(f"{server}.log"))
            except (RuntimeError, FileNotFoundError, ValueError, subprocess.SubprocessError) as e:
                self.failures.append(f"{server}: {e}")
                log(f"   FAILED: {e}")
            finally:
                if p is not None:
                    self._kill(p)
                    self.procs.remove(p)
        return self.report()

    def report(self):
        servers = [s for s in self.a.servers if self.results.get(s)]
        jobs = self.a.jobs
        L = []
        now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        fio_v = subprocess.run(["fio", "--version"], capture_output=True, text=True).stdout.strip()
        fstype = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", self.a.dir],
                                capture_output=True, text=True).stdout.strip() or "?"
        L.append(f"## NBD benchmark, {now}{' (quick smoke run)' if self.a.quick else ''}")
        L.append("")
        L.append(f"{os.cpu_count()} CPUs, kernel {platform.release()}, backing file "
                 f"{self.a.size >> 20} MiB of random data on {fstype}, {fio_v} (nbd engine, one "
                 f"connection), {self.a.runtime} s per job, page cache dropped before every job, "
                 f"Unix sockets. Load average at the end: "
                 f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}.")
        L.append("")

        def val(s, j):
            return self.results.get(s, {}).get(j)

        def fmt(v):
            return "-" if v is None else f"{v:.0f}"

        hdr = "| job | " + " | ".join(servers) + " |"
        sep = "|---|" + "---|" * len(servers)
        L.append("### Results (IOPS or MiB/s)")
        L.append("")
        L.append(hdr)
        L.append(sep)
        for j in jobs:
            unit = JOBS[j][3]
            cells = [fmt(val(s, j)) for s in servers]
            L.append(f"| {j} ({unit}) | " + " | ".join(cells) + " |")
        L.append("")
        for ref, title in (("limit", "the limit (fio io_uring O_DIRECT on the file)"),
                           ("ceiling", "the ceiling (nbdkit null + noextents)"),
                           ("qemu-nbd", "qemu-nbd")):
            if ref not in self.results or not self.results[ref]:
                continue
            L.append(f"### Ratio to {title}")
            L.append("")
            others = [s for s in servers if s != ref]
            L.append("| job | " + " | ".join(others) + " |")
            L.append("|---|" + "---|" * len(others))
            for j in jobs:
                r = val(ref, j)
                cells = []
                for s in others:
                    v = val(s, j)
                    cells.append("-" if v is None or not r else f"{v / r:.2f}")
                L.append(f"| {j} | " + " | ".join(cells) + " |")
            L.append("")
        L.append("### Commands")
        L.append("")
        for s in self.a.servers:
            if s in self.notes:
                L.append(f"- {s}: `{self.notes[s]}`")
        if self.failures:
            L.append("")
            L.append("### Failures")
            L.append("")
            for f in self.failures:
                first = f.strip().splitlines()[0] if f.strip() else f
                L.append(f"- {first}")
        L.append("")
        text = "\n".join(L)
        print(text)
        if self.a.out:
            with open(self.a.out, "w") as f:
                f.write(text)
            log(f"written to {self.a.out}")
        return 1 if self.failures else 0


def parse_size(s):
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    s = s.strip().lower().rstrip("ib").rstrip("i")
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 256 MiB file, 2 s per job")
    ap.add_argument("--runtime", type=int, help="seconds per fio job (default 15; --quick 2)")
    ap.add_argument("--size", help="backing file size (default 2G; --quick 256M)")
    ap.add_argument("--dir", default=os.path.join(HERE, "work"),
                    help="where the temp dir with the backing file goes; must be a real "
                         "filesystem with O_DIRECT (default bench/work)")
    ap.add_argument("--servers", default=",".join(SERVERS),
                    help="comma-separated subset of: " + ", ".join(SERVERS))
    ap.add_argument("--jobs", default=",".join(JOBS), help="comma-separated subset of: "
                    + ", ".join(JOBS))
    ap.add_argument("--rpointd", default=os.path.join(REPO, "build", "daemon", "rpointd"),
                    help="rpointd binary (default build/daemon/rpointd)")
    ap.add_argument("--out", help="also write the Markdown report here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, file)")
    a = ap.parse_args()
    a.runtime = a.runtime or (2 if a.quick else 15)
    a.size = parse_size(a.size or ("256M" if a.quick else "2G"))
    a.servers = [s for s in a.servers.split(",") if s]
    a.jobs = [j for j in a.jobs.split(",") if j]
    for s in a.servers:
        if s not in SERVERS:
            ap.error(f"unknown server {s}")
    for j in a.jobs:
        if j not in JOBS:
            ap.error(f"unknown job {j}")
    if a.size % (1 << 20):
        ap.error("--size must be a whole number of MiB")
    if os.geteuid() != 0:
        ap.error("run as root (the page cache is dropped before each job)")
    for tool in ("fio", "nbdinfo", "nbdcopy", "dd", "curl", "nbdkit", "qemu-nbd",
                 "qemu-storage-daemon"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} missing: bash scripts/install-deps.sh")

    b = Bench(a)
    atexit.register(b.cleanup)

    def on_signal(signum, _frame):
        b.cleanup()
        sys.exit(128 + signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        return b.run()
    finally:
        b.cleanup()


if __name__ == "__main__":
    sys.exit(main())
