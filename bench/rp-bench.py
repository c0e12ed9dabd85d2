#!/usr/bin/python3
"""Restore point benchmark: creation and restore rates, guest IOPS during a
copy-out, and the cut pause, each against an anchor measured in the same run.

  creation   incremental point of C MiB changed (1 MiB runs at random places of
             a D-byte disk): MiB/s of changed data, as a ratio to
             `cp --sparse=always` + fsync of a sparse raw file holding the same
             runs. Also the first (full) point of the disk: MiB/s of allocated
             data, against `cp --sparse=always` of the disk's own raw file.
  restore    PUT /disks/r {creationData: the incremental point's disk}: MiB/s
             of allocated data until the operation succeeds, against
             `cp --sparse=always` + fsync of the source disk's raw file.
  anchors    the same full point and restore also against `qemu-img convert -O raw`
             + sync, and against restic (a content-addressed backup tool): `restic
             backup` of the raw image (first full, then after the same change:
             restic rereads the image, rpointd reads only the change) and
             `restic restore`. Bytes read by rpointd (/proc/PID/io rchar) and by
             restic (total_bytes_processed) for each.
  scale      a 1 TiB sparse disk, --scale-changed (1 GiB) changed in 1 MiB runs:
             the incremental point's time, bytes read and stored, against cp
             --sparse=always + sync of a 1 TiB sparse file holding the same runs
             (restic would reread 1 TiB: its time is estimated from its rate).
  guest IOPS fio (nbd engine) 4k randwrite, then 4k randread, QD32 on a disk
             of a VM, first with no point in progress, then while a full point of that VM is being
             copied out (copy-before-write on every first write to a block
             not yet copied). Ratio during / idle, the median of --rounds rounds
             (each after a sync and a --settle pause, each a full point of a
             new collection). Then randwrite once more
             right after the point ended (no copy-out, a fresh change-tracking
             generation: every block's first write is a first mark), against
             the run after it (same generation, every block marked).
  cut pause  cutPauseMicroseconds of N points of a VM with a 1 TiB sparse disk
             and a 1 GiB disk (one block changed on each per point): p50, p99,
             max; idle, with fio randwrite at LOAD_IOPS on the VM's disk, and
             with fio randwrite unthrottled (QD32) on a 16 MiB region of it
             (so each point copies at most 16 MiB); for the unthrottled series
             also fio's write latency p99/max during the cuts against a run of
             the same load with no point in progress.

The page cache is dropped before each timed copy (root needed). Not a test:
run it by hand on a quiet machine and paste the report into bench/RESULTS.md.

  bench/rp-bench.sh                 # full: 2 GiB disk, 1 GiB changed, 200 cuts (~5 min)
  bench/rp-bench.sh --quick         # smoke: 256 MiB disk, 128 MiB changed, 20 cuts (~1 min)
  bench/rp-bench.sh --only cut --cuts 500
  bench/rp-bench.sh --only create,scale --no-restic
"""
import argparse
import atexit
import datetime
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))

import nbd  # noqa: E402  (python3-libnbd: run with /usr/bin/python3)

from rpointd_harness import Daemon, operation_path  # noqa: E402

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40
PARTS = ["create", "restore", "iops", "cut", "scale"]
LOAD_IOPS = 2000  # guest writes during the loaded cut series
UNTHROTTLED_SPAN = 16 * MiB  # the region the unthrottled cut load writes to


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def pct(values, p):
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Bench:
    def __init__(self, a):
        self.a = a
        self.rows = []       # (what, value, unit, anchor, anchor value, ratio)
        self.notes = []
        self.failures = []
        self.tmp = None
        self.d = None
        self.fio_procs = []
        self.full_rate = None   # MiB/s of the full point, sizes the fio run of part iops
        self.restic_rate = None  # MiB/s restic read the image at (part create)

    # ------------------------------------------------------------ plumbing

    def setup(self):
        os.makedirs(self.a.dir, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix="rp-bench.", dir=self.a.dir)
        self.d = Daemon(os.path.join(self.tmp, "state"),
                        config_text="io:\n  direct: false\n")
        self.d.start()
        log(f"rpointd up in {self.tmp}")

    def cleanup(self):
        for p in self.fio_procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if self.d is not None and self.d.proc is not None:
            try:
                self.d.stop()
            except Exception as e:  # noqa: BLE001 - cleanup must go on
                log(f"stopping rpointd: {e}")
                self.d.kill9()
        if self.tmp and not self.a.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def drop_caches(self):
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError:
            pass

    def api_ok(self, method, path, body=None, want=(200, 201, 202, 204)):
        r = self.d.api(method, path, body)
        if r.status not in want:
            raise RuntimeError(f"{method} {path}: {r.status} {r.raw[:500]!r}")
        return r

    def point(self, coll, name, exclude=()):
        """Creates a point; returns (seconds until the operation ended, point JSON)."""
        t0 = time.monotonic()
        r = self.d.start_restore_point(coll, name, exclude)
        if r.status != 201:
            raise RuntimeError(f"restore point {coll}/{name}: {r}")
        op = self.d.wait_operation(operation_path(r), timeout=3600, poll=0.01)
        dt = time.monotonic() - t0
        if op["status"] != "Succeeded":
            raise RuntimeError(f"restore point {coll}/{name} failed: {op}")
        return dt, self.d.get_restore_point(coll, name, expand="instanceView")

    def cp_sparse(self, src, dst):
        """Seconds for cp --sparse=always + fsync of the copy (the store fsyncs too)."""
        if os.path.exists(dst):
            os.unlink(dst)
        self.drop_caches()
        t0 = time.monotonic()
        subprocess.run(["cp", "--sparse=always", src, dst], check=True)
        subprocess.run(["sync", dst], check=True)
        dt = time.monotonic() - t0
        os.unlink(dst)
        return dt

    def qemu_convert(self, src, dst):
        """Seconds for qemu-img convert -O raw + sync of the copy."""
        if os.path.exists(dst):
            os.unlink(dst)
        self.drop_caches()
        t0 = time.monotonic()
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", src, dst], check=True)
        subprocess.run(["sync", dst], check=True)
        dt = time.monotonic() - t0
        os.unlink(dst)
        return dt

    def restic_env(self):
        return dict(os.environ, RESTIC_REPOSITORY=os.path.join(self.tmp, "restic-repo"),
                    RESTIC_PASSWORD="rp-bench",
                    RESTIC_CACHE_DIR=os.path.join(self.tmp, "restic-cache"))

    def restic_backup(self, path):
        """(seconds, bytes restic read, bytes it added) for `restic backup` of path."""
        env = self.restic_env()
        if not os.path.exists(env["RESTIC_REPOSITORY"]):
            subprocess.run(["restic", "init", "--quiet"], env=env, check=True,
                           stdout=subprocess.DEVNULL)
        self.drop_caches()
        t0 = time.monotonic()
        p = subprocess.run(["restic", "backup", "--json", "--host", "bench", path], env=env,
                           check=True, capture_output=True, text=True)
        dt = time.monotonic() - t0
        summary = {}
        for line in p.stdout.splitlines():
            try:
                j = json.loads(line)
            except ValueError:
                continue
            if j.get("message_type") == "summary":
                summary = j
        return dt, summary.get("total_bytes_processed", 0), summary.get("data_added", 0)

    def restic_restore(self, name):
        """Seconds for `restic restore latest` of the image + sync of the file."""
        env = self.restic_env()
        target = os.path.join(self.tmp, "restic-target")
        shutil.rmtree(target, ignore_errors=True)
        self.drop_caches()
        t0 = time.monotonic()
        subprocess.run(["restic", "restore", "latest", "--target", target], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["sync", "-f", target], check=True)
        dt = time.monotonic() - t0
        shutil.rmtree(target, ignore_errors=True)
        return dt

    def rchar(self):
        """Bytes rpointd has read by any syscall so far (/proc/PID/io rchar)."""
        with open(f"/proc/{self.d.proc.pid}/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
        return 0

    def write_runs(self, uri, runs, seed):
        """1 MiB runs of seeded random data at the given offsets, over NBD."""
        rng = random.Random(seed)
        h = nbd.NBD()
        h.connect_uri(uri)
        for off in runs:
            h.pwrite(rng.randbytes(MiB), off)
        h.flush()
        h.shutdown()

    def fio(self, uri, runtime, rw="randwrite", background=False, rate_iops=None, span=None):
        out = os.path.join(self.tmp, f"fio-{time.monotonic_ns()}.json")
        argv = ["fio", "--name=guest", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
                "--bs=4k", "--iodepth=32", "--time_based", f"--runtime={runtime}",
                "--output-format=json", f"--output={out}"]
        if rate_iops:
            argv.append(f"--rate_iops={rate_iops}")
        if span:
            argv.append(f"--size={span}")
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.fio_procs.append(p)
        if background:
            return p, out
        return self.fio_result(p, out, "read" if "read" in rw else "write")

    def fio_result(self, p, out, side="write"):
        _, err = p.communicate(timeout=3600)
        with open(out) as f:
            j = json.load(f)["jobs"][0]
        if p.returncode != 0 or j.get("error"):
            raise RuntimeError(f"fio failed ({p.returncode}): {err[-1000:]}")
        return j[side]["iops"]

    def row(self, what, value, unit, anchor=None, anchor_value=None, ratio=None):
        if ratio is None:
            ratio = value / anchor_value if anchor_value else None
        self.rows.append((what, value, unit, anchor, anchor_value, ratio))
        log(f"  {what}: {value:.1f} {unit}"
            + (f" ({ratio:.2f}x {anchor} = {anchor_value:.1f})" if ratio else ""))

    # ------------------------------------------------------------ parts

    def part_create_restore(self):
        a = self.a
        d = self.d
        d.create_disk("a", a.size)
        d.create_vm("vm", ["a"])
        d.create_collection("c", "vm")
        raw = self.api_ok("GET", "/disks/a").json["properties"]["path"]
        rng = random.Random(1)
        nruns = a.size // MiB
        # Base: half the disk in 1 MiB runs (the full point copies these).
        base = sorted(rng.sample(range(nruns), nruns // 2))
        self.write_runs(d.nbd_uri("a"), [r * MiB for r in base], seed=2)
        base_mib = len(base)
        self.drop_caches()
        dt, _ = self.point("c", "full")
        cp = self.cp_sparse(raw, os.path.join(self.tmp, "a.copy"))
        self.full_rate = base_mib / dt
        self.row("full point (first point of a disk)", base_mib / dt, "MiB/s",
                 "cp --sparse=always of the raw file", base_mib / cp)
        qc = self.qemu_convert(raw, os.path.join(self.tmp, "a.qemu"))
        self.row("full point (first point of a disk)", base_mib / dt, "MiB/s",
                 "qemu-img convert -O raw of the raw file", base_mib / qc)
        if self.a.restic:
            rt, rread, _ = self.restic_backup(raw)
            self.restic_rate = (a.size / MiB) / rt  # what restic reads per second
            self.row("full point (first point of a disk)", base_mib / dt, "MiB/s",
                     "restic backup of the raw file (first)", base_mib / rt)
            self.notes.append(f"restic's first backup read {rread / MiB:.0f} MiB "
                              f"(the whole {a.size >> 20} MiB image) in {rt:.1f} s")

        # Incremental: `changed` MiB in 1 MiB runs anywhere on the disk.
        changed = sorted(rng.sample(range(nruns), a.changed // MiB))
        self.write_runs(d.nbd_uri("a"), [r * MiB for r in changed], seed=3)
        ref = os.path.join(self.tmp, "changed.raw")
        with open(ref, "wb") as f:
            f.truncate(a.size)
            g = random.Random(3)
            for r in changed:
                f.seek(r * MiB)
                f.write(g.randbytes(MiB))
        self.drop_caches()
        r0 = self.rchar()
        dt, rp = self.point("c", "inc")
        inc_read = self.rchar() - r0
        drp = self.api_ok("GET", "/restorePointCollections/c/restorePoints/inc/"
                                 "diskRestorePoints/a").json["properties"]
        cp = self.cp_sparse(ref, os.path.join(self.tmp, "changed.copy"))
        os.unlink(ref)
        mib = len(changed)
        self.row(f"incremental point ({mib} MiB changed)", mib / dt, "MiB/s",
                 "cp --sparse=always of the same bytes", mib / cp)
        self.notes.append(f"incremental point stored {drp['bytesStored'] / MiB:.1f} MiB for "
                          f"{mib} MiB changed ({drp['blocksChanged']} blocks); rpointd read "
                          f"{inc_read / MiB:.0f} MiB for it (rchar)")
        if self.a.restic:
            rt, rread, radded = self.restic_backup(raw)
            self.row(f"incremental point ({mib} MiB changed)", mib / dt, "MiB/s",
                     "restic backup after the same change", mib / rt)
            self.notes.append(f"restic's backup after the change read {rread / MiB:.0f} MiB "
                              f"(the whole image again: no change tracking) and added "
                              f"{radded / MiB:.0f} MiB in {rt:.1f} s; rpointd read "
                              f"{inc_read / MiB:.0f} MiB in {dt:.1f} s")
        self.row(f"cut pause of that incremental point ({mib} MiB changed)",
                 rp["properties"]["instanceView"]["cutPauseMicroseconds"], "us")

        # Restore the incremental point (all of the disk's data) into a new disk.
        allocated = len(set(base) | set(changed))
        self.drop_caches()
        t0 = time.monotonic()
        r = self.api_ok("PUT", "/disks/r", {"properties": {"creationData": {
            "createOption": "Restore",
            "sourceResourceId": "/restorePointCollections/c/restorePoints/inc/diskRestorePoints/a"}}})
        op = d.wait_operation(operation_path(r), timeout=3600, poll=0.01)
        dt = time.monotonic() - t0
        if op["status"] != "Succeeded":
            raise RuntimeError(f"restore failed: {op}")
        cp = self.cp_sparse(raw, os.path.join(self.tmp, "a.copy"))
        self.row(f"restore (create disk from a point, {allocated} MiB allocated)",
                 allocated / dt, "MiB/s", "cp --sparse=always of the raw file", allocated / cp)
        qc = self.qemu_convert(raw, os.path.join(self.tmp, "a.qemu"))
        self.row(f"restore (create disk from a point, {allocated} MiB allocated)",
                 allocated / dt, "MiB/s", "qemu-img convert -O raw of the raw file",
                 allocated / qc)
        if self.a.restic:
            rt = self.restic_restore(raw)
            self.row(f"restore (create disk from a point, {allocated} MiB allocated)",
                     allocated / dt, "MiB/s", "restic restore of the latest backup",
                     allocated / rt)

    def part_scale(self):
        """1 TiB sparse disk, --scale-changed MiB changed: cost follows the change."""
        a = self.a
        d = self.d
        d.create_disk("t", TiB)
        d.create_vm("tvm", ["t"])
        d.create_collection("ct", "tvm")
        rng = random.Random(5)
        nruns = TiB // MiB
        base = rng.sample(range(nruns), 64)
        self.write_runs(d.nbd_uri("t"), [r * MiB for r in base], seed=6)
        self.point("ct", "base")
        changed = sorted(rng.sample(range(nruns), a.scale_changed // MiB))
        self.write_runs(d.nbd_uri("t"), [r * MiB for r in changed], seed=7)
        ref = os.path.join(self.tmp, "scale.raw")
        with open(ref, "wb") as f:
            f.truncate(TiB)
            g = random.Random(7)
            for r in changed:
                f.seek(r * MiB)
                f.write(g.randbytes(MiB))
        self.drop_caches()
        r0 = self.rchar()
        dt, _ = self.point("ct", "inc")
        read = self.rchar() - r0
        drp = self.api_ok("GET", "/restorePointCollections/ct/restorePoints/inc/"
                                 "diskRestorePoints/t").json["properties"]
        cp = self.cp_sparse(ref, os.path.join(self.tmp, "scale.copy"))
        os.unlink(ref)
        mib = len(changed)
        self.row(f"scale: incremental point, 1 TiB disk, {mib} MiB changed", mib / dt, "MiB/s",
                 "cp --sparse=always of a 1 TiB sparse file of the same runs", mib / cp)
        note = (f"scale: the incremental point of {mib} MiB changed on the 1 TiB disk took "
                f"{dt:.1f} s, read {read / MiB:.0f} MiB (rchar) and stored "
                f"{drp['bytesStored'] / MiB:.0f} MiB")
        if getattr(self, "restic_rate", None):
            est = (TiB / MiB) / self.restic_rate
            note += (f"; restic would reread the whole 1 TiB: about {est / 3600:.1f} h at the "
                     f"{self.restic_rate:.0f} MiB/s it read the image in part create "
                     "(an estimate, not run)")
        self.notes.append(note)

    def part_iops(self):
        a = self.a
        d = self.d
        d.create_disk("g", a.size)
        d.create_vm("io", ["g"])
        uri = d.nbd_uri("g")
        # Fill the disk so that a full point has a.size bytes to copy out.
        fill = os.path.join(self.tmp, "fill.raw")
        subprocess.run(["dd", "if=/dev/urandom", f"of={fill}", "bs=1M",
                        f"count={a.size // MiB}", "status=none"], check=True)
        subprocess.run(["nbdcopy", fill, uri], check=True)
        os.unlink(fill)
        runtime = a.runtime
        if self.full_rate:
            # The copy-out must outlast both fio runs: 30% of the expected copy time each.
            runtime = max(1, min(runtime, int(0.3 * (a.size / MiB) / self.full_rate)))
        # Rounds: each after a sync and a settle pause (the idle anchor swung
        # with the fill's writeback), each a full point (a new collection has
        # no base) copied out under fio; the report takes the median ratio.
        ratios = {"randwrite": [], "randread": []}
        per_round = []
        still = True
        totals = []
        for rnd in range(a.rounds):
            os.sync()
            time.sleep(a.settle)
            load = os.getloadavg()[0]
            idle = {rw: self.fio(uri, runtime, rw=rw) for rw in ("randwrite", "randread")}
            coll = f"cio{rnd}"
            d.create_collection(coll, "io")
            r = d.start_restore_point(coll, "p")
            if r.status != 201:
                raise RuntimeError(f"restore point: {r}")
            op_path = operation_path(r)
            t0 = time.monotonic()
            busy = {}
            for rw in ("randwrite", "randread"):
                busy[rw] = self.fio(uri, runtime, rw=rw)
                still = still and d.api("GET", op_path).json["status"] == "InProgress"
            op = d.wait_operation(op_path, timeout=3600)
            totals.append(time.monotonic() - t0)
            if op["status"] != "Succeeded":
                raise RuntimeError(f"point under fio failed: {op}")
            for rw in ratios:
                ratios[rw].append((busy[rw] / idle[rw], busy[rw], idle[rw]))
            per_round.append(
                f"round {rnd + 1}: randwrite {busy['randwrite']:.0f} / {idle['randwrite']:.0f} = "
                f"{busy['randwrite'] / idle['randwrite']:.2f}, randread {busy['randread']:.0f} / "
                f"{idle['randread']:.0f} = {busy['randread'] / idle['randread']:.2f} "
                f"(load average {load:.2f} at its start)")
            log("  " + per_round[-1])
        total = sorted(totals)[len(totals) // 2]
        # Right after the point ended: no copy-out, but a fresh change-tracking
        # generation, so every block's first write in it is a first mark.
        # Anchor: the same run again in that generation (every block marked by
        # then), measured after the fill's writeback is long over.
        fresh = self.fio(uri, runtime, rw="randwrite")
        marked = self.fio(uri, runtime, rw="randwrite")
        for rw in ("randwrite", "randread"):
            vals = sorted(ratios[rw])
            ratio, b, i = vals[len(vals) // 2]
            if len(vals) % 2 == 0:
                ratio = (vals[len(vals) // 2 - 1][0] + ratio) / 2
            self.row(f"guest 4k {rw} QD32 during a copy-out (median of {len(vals)} rounds)", b,
                     "IOPS", "no point in progress", i, ratio=ratio)
        self.row("guest 4k randwrite QD32 right after a point (fresh generation, no copy-out)",
                 fresh, "IOPS", "the next run (every block marked)", marked)
        self.notes.append(
            f"{a.rounds} rounds, each after sync + {a.settle:g} s: " + "; ".join(per_round))
        self.notes.append(
            f"copy-out of {a.size >> 20} MiB took {total:.1f} s (median) with fio randwrite then "
            f"randread "
            f"running for {runtime} s each; "
            + ("the point was still copying when each fio run ended (both overlapped it)"
               if still else f"WARNING: the copy-out ended before the fio runs did: "
                             "use --runtime shorter or --size larger"))

    def part_cut(self):
        a = self.a
        d = self.d
        d.create_disk("huge", TiB)
        d.create_disk("small", GiB)
        d.create_vm("cutvm", ["huge", "small"])
        d.create_collection("ccut", "cutvm")
        h1, h2 = nbd.NBD(), nbd.NBD()
        h1.connect_uri(d.nbd_uri("huge"))
        h2.connect_uri(d.nbd_uri("small"))
        rng = random.Random(4)
        results = {}
        loaded = f"fio randwrite {LOAD_IOPS} IOPS running"
        unthrottled = "fio randwrite unthrottled QD32 running"
        anchor = None
        for mode in ("idle", loaded, unthrottled):
            bg = None
            cuts = a.cuts
            prefix = {"idle": "i", loaded: "l", unthrottled: "u"}[mode]
            if mode == loaded:
                # Rate-limited: every point copies what fio dirtied since the last one,
                # so an unlimited fio over the whole disk would turn each point into a
                # large copy-out.
                bg = self.fio(d.nbd_uri("small"), runtime=3600, background=True,
                              rate_iops=LOAD_IOPS)
                time.sleep(1)
                cuts = max(10, a.cuts // 4)
            elif mode == unthrottled:
                # Unthrottled on a small region: the cut races a full-speed writer,
                # each point copies at most UNTHROTTLED_SPAN. The anchor: the same
                # load for a few seconds with no point in progress.
                anchor = self.fio(d.nbd_uri("small"), runtime=a.runtime,
                                  span=UNTHROTTLED_SPAN)
                p, out = self.fio(d.nbd_uri("small"), runtime=3600, background=True,
                                  span=UNTHROTTLED_SPAN)
                bg = (p, out)
                time.sleep(1)
                cuts = max(40, a.cuts // 4)
            pauses = []
            for i in range(cuts):
                h1.pwrite(rng.randbytes(4096), rng.randrange(TiB // 4096) * 4096)
                h2.pwrite(rng.randbytes(4096), rng.randrange(GiB // 4096) * 4096)
                name = f"{prefix}{i}"
                _, rp = self.point("ccut", name)
                pauses.append(rp["properties"]["instanceView"]["cutPauseMicroseconds"])
                if i > 0:  # keep the store small; deleting is part of the steady state
                    self.api_ok("DELETE", f"/restorePointCollections/ccut/restorePoints/"
                                          f"{prefix}{i - 1}")
            if bg:
                bg[0].send_signal(signal.SIGINT)
                try:
                    bg[0].wait(30)
                except subprocess.TimeoutExpired:
                    bg[0].kill()
            results[mode] = pauses
            self.row(f"cut pause p50 ({mode}, {cuts} cuts)", pct(pauses, 50), "us")
            self.row(f"cut pause p99 ({mode})", pct(pauses, 99), "us")
            self.row(f"cut pause max ({mode})", max(pauses), "us")
            if mode == unthrottled:
                # fio stopped by SIGINT may print a line before its JSON.
                with open(bg[1]) as f:
                    text = f.read()
                if "{" not in text:
                    self.notes.append(f"fio wrote no JSON after SIGINT: {text[:200]!r}")
                else:
                    j = json.loads(text[text.index("{"):])["jobs"][0]["write"]
                    clat = j["clat_ns"]
                    lat99 = clat.get("percentile", {}).get("99.000000", float("nan")) / 1000
                    self.row("guest write IOPS during the unthrottled cut series", j["iops"],
                             "IOPS", "the same load, no point in progress", anchor)
                    self.notes.append("guest 4k write latency during the unthrottled cut "
                                      f"series: p99 {lat99:.0f} us, max {clat['max'] / 1000:.0f} us")
        h1.shutdown()
        h2.shutdown()
        self.notes.append("cut VM: a 1 TiB sparse disk and a 1 GiB disk; one 4 KiB block "
                          "changed on each before every point; the previous point deleted; "
                          f"the loaded series runs a quarter of the cuts with fio at {LOAD_IOPS} "
                          "IOPS on the 1 GiB disk; the unthrottled series max(40, a quarter) "
                          f"with fio QD32 unthrottled on the first {UNTHROTTLED_SPAN >> 20} MiB "
                          "of the 1 GiB disk")
        return results

    # ------------------------------------------------------------ run/report

    def run(self):
        self.setup()
        parts = {"create": self.part_create_restore, "restore": None,
                 "iops": self.part_iops, "cut": self.part_cut, "scale": self.part_scale}
        for p in self.a.only:
            if parts.get(p) is None:
                continue
            log(f"== {p}")
            try:
                parts[p]()
            except Exception as e:  # noqa: BLE001 - one failed part must not hide the others
                self.failures.append(f"{p}: {e}")
                log(f"FAILED {p}: {e}")
        self.report()
        return 1 if self.failures else 0

    def report(self):
        a = self.a
        fstype = subprocess.run(["stat", "-f", "-c", "%T", self.a.dir], capture_output=True,
                                text=True).stdout.strip()
        lines = [f"## rp-bench {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
                 "",
                 f"{platform.node()}: {os.cpu_count()} CPUs, {platform.release()}, {fstype}; "
                 f"disk {a.size >> 20} MiB, {a.changed >> 20} MiB changed, fio {a.runtime} s, "
                 f"{a.cuts} cuts; load average at the end {os.getloadavg()[0]:.2f}",
                 "",
                 "| what | value | anchor (same run) | anchor value | ratio |",
                 "|---|---:|---|---:|---:|"]
        for what, v, unit, anchor, av, ratio in self.rows:
            lines.append(f"| {what} | {v:.1f} {unit} | {anchor or ''} | "
                         f"{'' if av is None else f'{av:.1f} {unit}'} | "
                         f"{'' if ratio is None else f'{ratio:.2f}'} |")
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        if self.failures:
            lines += ["", "### Failures", ""] + [f"- {f}" for f in self.failures]
        text = "\n".join(lines) + "\n"
        print(text)
        if a.out:
            with open(a.out, "w") as f:
                f.write(text)


def parse_size(s):
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    s = s.strip().lower().rstrip("ib").rstrip("i")
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 256 MiB disk, 128 MiB changed, 3 s fio, 20 cuts")
    ap.add_argument("--size", help="disk size (default 2G; --quick 256M)")
    ap.add_argument("--changed", help="changed data for the incremental point "
                                      "(default 1G; --quick 128M)")
    ap.add_argument("--scale-changed", help="changed data on the 1 TiB disk of part scale "
                                            "(default 1G; --quick 128M)")
    ap.add_argument("--no-restic", dest="restic", action="store_false",
                    help="skip the restic anchors")
    ap.add_argument("--runtime", type=int, help="seconds of fio per measurement "
                                                 "(default 8; --quick 3)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="part iops: idle/copy-out rounds, the median ratio is reported (default 3)")
    ap.add_argument("--settle", type=float, default=5,
                    help="part iops: seconds to wait after the sync before each round (default 5)")
    ap.add_argument("--cuts", type=int, help="points per cut-pause series (default 200; "
                                             "--quick 20)")
    ap.add_argument("--only", default=",".join(PARTS),
                    help="comma-separated subset of: " + ", ".join(PARTS)
                         + " (create and restore run together)")
    ap.add_argument("--dir", default=os.path.join(HERE, "work"),
                    help="where the temp dir goes (a real filesystem, not tmpfs)")
    ap.add_argument("--out", help="also write the Markdown report here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (state, logs)")
    a = ap.parse_args()
    a.size = parse_size(a.size or ("256M" if a.quick else "2G"))
    a.changed = parse_size(a.changed or ("128M" if a.quick else "1G"))
    a.scale_changed = parse_size(a.scale_changed or ("128M" if a.quick else "1G"))
    a.runtime = a.runtime or (3 if a.quick else 8)
    a.cuts = a.cuts or (20 if a.quick else 200)
    a.only = [p.strip() for p in a.only.split(",") if p.strip()]
    if "restore" in a.only and "create" not in a.only:
        a.only.append("create")
    for p in a.only:
        if p not in PARTS:
            ap.error(f"unknown part {p}")
    if a.rounds < 1:
        ap.error("--rounds: at least 1")
    if a.size % MiB or a.changed % MiB or a.changed > a.size:
        ap.error("--size and --changed: whole MiB, changed <= size")
    if os.geteuid() != 0:
        log("warning: not root, the page cache is not dropped between copies")
    for tool in ("fio", "nbdcopy", "cp", "dd", "qemu-img") + (("restic",) if a.restic else ()):
        if shutil.which(tool) is None:
            ap.error(f"{tool} missing: bash scripts/install-deps.sh")

    b = Bench(a)
    atexit.register(b.cleanup)

    def on_signal(signum, _frame):
        b.cleanup()
        sys.exit(128 + signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        return b.run()
    finally:
        b.cleanup()


if __name__ == "__main__":
    sys.exit(main())
