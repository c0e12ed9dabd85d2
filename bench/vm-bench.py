#!/usr/bin/python3
"""bench/vm-bench.py: block devices inside the VM lane, against a kernel loop device.

One boot of the lane's 6.12 kernel (tests/vm/lane.py; --kernel 6.17: trixie-backports
6.17, where ublk rows are zero copy by default, UBLK_F_AUTO_BUF_REG). Inside, one backing file
of random data, and in turn (rows):
  loop  losetup --direct-io=on on the file             (the anchor)
  nbd   /dev/nbd0: nbd-client over rpointd's Unix socket, rpointd serving the
        same file (adopted, io.direct: true)
  nbdtcp /dev/nbd2: the same over rpointd's TCP listener (--with-tcp)
  nbdkit /dev/nbd1: the same nbd-client over nbdkit's file plugin (cache=none),
        only with --with-nbdkit: what the kernel's NBD client costs by itself
  ublk  /dev/ublkbN: rpointd serving the same file as a ublk disk
        (PUT /disks/{d} {"properties": {"path": F, "export": "ublk"}}, the
        device from GET /disks/{d} properties.export.ublk.devicePath), only
        with --with-ublk (needs rpointd's ublk transport, issue #11); the
        default buffer mode: the driver copies into per-tag buffers (on 6.17
        zero copy, `ublk.zero_copy: auto`; the copy path there is a variant:
        --ublk-variant copy='{zero_copy: off}')
  ublkuc the same with `ublk.user_copy: true` (--with-ublk-user-copy):
        UBLK_F_USER_COPY (6.5+), rpointd copies the data itself
  ublk_L the same with `ublk: {...}` of --ublk-variant L={...} (e.g.
        --ublk-variant plain='{taskrun: plain}'): an A/B of rpointd's ublk
        settings in one boot
rpointd is restarted whenever the next ublk row wants other ublk settings.
Each row runs the same fio jobs (libaio, O_DIRECT); --rounds N repeats all
rows N times in the same boot (interleaved, so drifting host load hits every
row alike). Prints a Markdown report with every row's ratio to loop in the
same round (the median over rounds), the mean requests in flight at the
device and at the backing virtio disk (from /sys/block/*/stat time in queue),
the guest's idle CPU, and the host's load average (bench/README.md "vm-bench").

    bench/vm-bench.py                      # about 3 minutes on a quiet machine
    bench/vm-bench.py --with-ublk --out /tmp/vm-bench.md
    bench/vm-bench.py --runtime 5 --size 128M --jobs randread-4k,read-1m
    bench/vm-bench.py --with-ublk --ublk-variant plain='{taskrun: plain}' --rounds 3
    bench/vm-bench.py --kernel 6.17 --with-ublk --ublk-variant copy='{zero_copy: off}'
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "vm"))
import lane  # noqa: E402

# name: (fio arguments, the measure reported)
JOBS = {
    "randread-4k": ("--rw=randread --bs=4k --iodepth=32", "iops"),
    "randwrite-4k": ("--rw=randwrite --bs=4k --iodepth=32", "iops"),
    "read-1m": ("--rw=read --bs=1m --iodepth=8", "MiB/s"),
    "write-1m": ("--rw=write --bs=1m --iodepth=8", "MiB/s"),
}

# The guest script. Each row is one shell function that prints the device it
# set up on stdout, and one that tears it down; adding a transport is one
# more pair of functions and its name in ROWS.
GUEST = r"""
set -u
T=/tools
S=/tmp/state
F=/data/bench.img
export RPOINT_SOCKET=$S/control.sock
die() { echo "@@BENCH-FAIL $*@@"; tail -n 20 /tmp/rpointd.log; dmesg | tail -n 20; exit 1; }
mkdir -p /data $S
if [ "$BACKING" = disk ]; then
  i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  mount -t ext4 /dev/vda /data || die "mount /dev/vda"
fi
echo "bench: filling $F ($SIZE_MB MiB of random data)"
dd if=/dev/urandom of=$F bs=1M count=$SIZE_MB conv=fsync 2>/dev/null || die "fill $F"
ip link set lo up
cat >/tmp/rpointd.base.yaml <<EOF
io: {direct: true}
adopt_paths: [/data]
nbd: {tcp: "127.0.0.1:10809"}
EOF
cp /tmp/rpointd.base.yaml /tmp/rpointd.yaml
echo base >/tmp/rpointd.variant
start_rpointd() {
  $T/rpointd --state-dir $S --config /tmp/rpointd.yaml --log-level info >>/tmp/rpointd.log 2>&1 &
  echo $! >/tmp/rpointd.pid
  i=0
  until $T/rpoint daemon status >/dev/null 2>&1 && [ -S $S/nbd.sock ]; do
    i=$((i+1)); [ $i -gt 600 ] && die "rpointd did not start"
    sleep 0.1
  done
}
start_rpointd

up_loop() { $T/losetup --direct-io=on --show -f $F; }
down_loop() { $T/losetup -d "$1"; }

up_nbd() {
  $T/rpoint disk create bnbd --path $F >/dev/null || return 1
  $T/nbd-client -unix $S/nbd.sock -N bnbd /dev/nbd0 -b 4096 >/tmp/nbd-client.out 2>&1 ||
    { cat /tmp/nbd-client.out >&2; return 1; }
  echo /dev/nbd0
}
down_nbd() { $T/nbd-client -d /dev/nbd0 && sleep 0.5 && $T/rpoint disk delete bnbd >/dev/null; }

# The same over rpointd's TCP listener on the guest's loopback (--with-tcp).
up_nbdtcp() {
  $T/rpoint disk create btcp --path $F >/dev/null || return 1
  $T/nbd-client 127.0.0.1 10809 -N btcp /dev/nbd2 -b 4096 >/tmp/nbd-client.out 2>&1 ||
    { cat /tmp/nbd-client.out >&2; return 1; }
  echo /dev/nbd2
}
down_nbdtcp() { $T/nbd-client -d /dev/nbd2 && sleep 0.5 && $T/rpoint disk delete btcp >/dev/null; }

# An anchor for the kernel's NBD client itself: nbdkit's file plugin (O_DIRECT)
# on the same file, attached the same way (--with-nbdkit).
up_nbdkit() {
  $T/nbdkit --unix /tmp/nbdkit.sock --pidfile /tmp/nbdkit.pid file $F cache=none >/dev/null 2>/tmp/nbdkit.log ||
    return 1
  i=0; while [ ! -S /tmp/nbdkit.sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  $T/nbd-client -unix /tmp/nbdkit.sock /dev/nbd1 -b 4096 >/tmp/nbd-client.out 2>&1 ||
    { cat /tmp/nbd-client.out >&2; return 1; }
  echo /dev/nbd1
}
down_nbdkit() { $T/nbd-client -d /dev/nbd1 && kill "$(cat /tmp/nbdkit.pid)"; }

# The ublk transport's API (issue #11): a disk created with export "ublk"
# shows its block device in GET /disks/{d} properties.export.ublk.devicePath.
up_ublk() {
  code=$($T/curl -s -o /tmp/ublk.out -w '%{http_code}' --unix-socket $S/control.sock -X PUT \
    -H 'Content-Type: application/json' \
    -d "{\"properties\": {\"path\": \"$F\", \"export\": \"ublk\"}}" http://localhost/disks/bublk)
  case "$code" in
    2??) ;;
    *) echo "ublk: PUT /disks/bublk answered $code: $(cat /tmp/ublk.out)" >&2; return 1 ;;
  esac
  grep -o 'ublk [0-9]*: /dev/ublkb[0-9]* serves disk bublk.*' /tmp/rpointd.log | tail -n 1 >&2
  i=0
  while :; do
    dev=$($T/rpoint -o json disk show bublk | tr -d ' \n' |
          sed -n 's/.*"ublk":{[^}]*"devicePath":"\([^"]*\)".*/\1/p')
    [ -n "$dev" ] && [ -b "$dev" ] && break
    i=$((i+1))
    if [ $i -gt 100 ]; then
      echo "ublk: no properties.export.ublk.devicePath 10 s after the PUT:" >&2
      $T/rpoint -o json disk show bublk >&2
      return 1
    fi
    sleep 0.1
  done
  echo "$dev"
}
down_ublk() { $T/rpoint disk delete bublk >/dev/null; }

# rpointd with the base config plus `ublk: $2` (variant $1; base: none),
# restarted only when it runs another variant. Runs in a subshell, so rpointd
# is stopped by its recorded pid and started anew.
use_variant() {
  [ "$(cat /tmp/rpointd.variant)" = "$1" ] && return 0
  pid=$(cat /tmp/rpointd.pid)
  kill "$pid"
  # Its parent (this script) is waiting for this subshell, so it stays a
  # zombie: gone or Z is stopped.
  i=0
  while st=$(cut -d' ' -f3 /proc/$pid/stat 2>/dev/null) && [ -n "$st" ] && [ "$st" != Z ]; do
    i=$((i+1)); [ $i -gt 300 ] && { echo "rpointd $pid did not stop" >&2; return 1; }; sleep 0.1
  done
  cp /tmp/rpointd.base.yaml /tmp/rpointd.yaml
  [ -n "$2" ] && echo "ublk: $2" >>/tmp/rpointd.yaml
  echo "$1" >/tmp/rpointd.variant
  start_rpointd >&2
}
# The ublk rows: ublk (base config), ublkuc (user copy), ublk_L (variant L).
up_ublkrow() {
  case "$1" in
    ublk) use_variant base "" ;;
    ublkuc) use_variant uc "{user_copy: true}" ;;
    *) eval "v=\$VARIANT_${1#ublk_}"; use_variant "$1" "$v" ;;
  esac || return 1
  up_ublk
}

# What the kernel counts for a block device: "time_in_queue_ms" (field 11 of
# /sys/block/X/stat: the sum over requests of their time in flight).
tiq() { [ -e /sys/block/$1/stat ] && awk '{print $11}' /sys/block/$1/stat || echo 0; }
# Guest CPU: idle and total jiffies.
cpu() { awk '/^cpu /{t=0; for (i=2; i<=NF; i++) t+=$i; print $5, t}' /proc/stat; }
# rpointd's threads by role: CPU ticks (utime+stime) of iou-wrk (io_uring's
# workers), ublk queue threads and the rest.
threads() {
  p=$(cat /tmp/rpointd.pid); w=0; q=0; o=0
  for t in /proc/$p/task/*; do
    c=$(cat $t/comm 2>/dev/null); s=$(awk '{print $14+$15}' $t/stat 2>/dev/null) || continue
    [ -n "$s" ] || continue
    case "$c" in iou-wrk*) w=$((w+s));; ublk*q*) q=$((q+s));; *) o=$((o+s));; esac
  done
  echo "$w $q $o"
}

backing=vda; [ "$BACKING" = disk ] || backing=none
for round in $(seq $ROUNDS); do
for row in $ROWS; do
  case "$row" in ublk*) up=up_ublkrow; down=down_ublk ;; *) up=up_$row; down=down_$row ;; esac
  dev=$($up $row 2>/tmp/up.err) || die "$row: could not set up the device: $(tr '\n' ' ' </tmp/up.err | cut -c1-600)"
  q=/sys/block/${dev#/dev/}/queue
  echo "@@UP $row $(tr '\n' ' ' </tmp/up.err | cut -c1-300)@@"
  echo "@@QUEUE $row $dev max_sectors_kb=$(cat $q/max_sectors_kb) max_hw_sectors_kb=$(cat $q/max_hw_sectors_kb) max_segments=$(cat $q/max_segments) logical_block_size=$(cat $q/logical_block_size)@@"
  for job in $JOBNAMES; do
    eval "args=\$JOB_$(echo $job | tr - _)"
    sync; echo 3 >/proc/sys/vm/drop_caches
    b=${dev#/dev/}
    s0="$(cut -d' ' -f1 /proc/uptime) $(tiq $b) $(tiq $backing) $(cpu) $(threads)"
    # shellcheck disable=SC2086
    $T/fio --name=$job --filename=$dev --direct=1 --ioengine=libaio $args --time_based \
      --runtime=$RUNTIME --ramp_time=1 --output-format=json --output=/tmp/fio.json >/dev/null 2>/tmp/fio.err ||
      { cat /tmp/fio.err; die "$row $job: fio failed"; }
    s1="$(cut -d' ' -f1 /proc/uptime) $(tiq $b) $(tiq $backing) $(cpu) $(threads)"
    # Mean requests in flight (Little: time in queue over wall time, ramp
    # included), guest idle %, rpointd CPU seconds by role (iou-wrk, queues, rest).
    echo "$s0 $s1" | awk -v r=$row -v j=$job -v rd=$round '{
      ms=($9-$1)*1000; if (ms<=0) ms=1; tot=($13-$5); if (tot<=0) tot=1
      printf "@@STAT %s %s %s %.2f %.2f %.0f %.2f %.2f %.2f@@\n", rd, r, j, ($10-$2)/ms, ($11-$3)/ms,
        100*($12-$4)/tot, ($14-$6)/100, ($15-$7)/100, ($16-$8)/100 }'
    echo "@@FIO $round $row $job@@"
    cat /tmp/fio.json
    echo "@@FIO-END@@"
  done
  $down "$dev" || die "$row: teardown failed"
done
done
if dmesg | grep -E "I/O error|EXT4-fs error"; then die "the kernel logged I/O errors"; fi
echo "@@BENCH-DONE@@"
"""


def tool(name):
    for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        p = os.path.join(d, name)
        if os.path.exists(p):
            return p
    raise lane.LaneError(f"{name} is missing (tests/vm/install.sh installs it)")


def parse_size(s):
    m = re.fullmatch(r"(\d+)([MG]?)", s)
    if not m:
        raise argparse.ArgumentTypeError(f"size: N, NM or NG, got {s!r}")
    return int(m.group(1)) * {"": 1, "M": 1, "G": 1024}[m.group(2)]  # MiB


def workroot():
    d = os.path.join(HERE, "work")  # git-ignored, on a real filesystem (cache=none needs O_DIRECT)
    os.makedirs(d, exist_ok=True)
    return d


def loadavg():
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


def measure(job_json, kind):
    j = job_json["jobs"][0]
    side = j["write"] if j["write"]["io_bytes"] else j["read"]
    return side["iops"] if kind == "iops" else side["bw_bytes"] / (1 << 20)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--build", default=os.environ.get("RPOINTD_BUILD_DIR",
                                                     os.path.join(REPO, "build")))
    p.add_argument("--kernel", default=lane.Kernel.DEFAULT_SERIES, choices=sorted(lane.Kernel.SERIES),
                   help="kernel series to boot (default %(default)s, the CI lane's)")
    p.add_argument("--size", type=parse_size, default=512, help="backing file (default 512M)")
    p.add_argument("--runtime", type=int, default=10, help="seconds per fio job (default 10)")
    p.add_argument("--jobs", default=",".join(JOBS), help="comma-separated, of " + ", ".join(JOBS))
    p.add_argument("--with-ublk", action="store_true",
                   help="add the ublk row (needs rpointd's ublk transport)")
    p.add_argument("--with-ublk-user-copy", action="store_true",
                   help="add the ublkuc row: ublk with ublk.user_copy true (UBLK_F_USER_COPY)")
    p.add_argument("--ublk-variant", action="append", default=[], metavar="L={...}",
                   help="add a ublk_L row: rpointd with `ublk: {...}` (a YAML flow map, e.g. "
                        "plain='{taskrun: plain}'); repeatable")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every row this many times in the same boot, interleaved (default 1)")
    p.add_argument("--with-tcp", action="store_true",
                   help="add an nbdtcp row: rpointd over TCP on the guest's loopback")
    p.add_argument("--with-nbdkit", action="store_true",
                   help="add an nbdkit row (file plugin, cache=none, same nbd-client): the "
                        "kernel NBD client's own cost, apart from rpointd's")
    p.add_argument("--backing", choices=["disk", "ram"], default="disk",
                   help="disk: the file on an ext4 virtio disk (qemu cache=none); ram: on the "
                        "guest's tmpfs (transport cost only)")
    p.add_argument("--out", help="also write the report here")
    p.add_argument("--workdir", help="default: a new temp dir (removed unless --keep)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--timeout", type=float, default=1800)
    a = p.parse_args()
    jobs = a.jobs.split(",")
    for j in jobs:
        if j not in JOBS:
            p.error(f"unknown job {j!r}")
    variants = {}
    for v in a.ublk_variant:
        label, sep, flow = v.partition("=")
        if not sep or not re.fullmatch(r"[a-z0-9]+", label) or not re.fullmatch(r"\{[^'\n]*\}", flow):
            p.error(f"--ublk-variant: LABEL={{yaml flow map}} (label a-z0-9), got {v!r}")
        variants[label] = flow
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    rows = (["loop", "nbd"] + (["nbdtcp"] if a.with_tcp else []) +
            (["nbdkit"] if a.with_nbdkit else []) +
            (["ublk"] if a.with_ublk else []) + (["ublkuc"] if a.with_ublk_user_copy else []) +
            ["ublk_" + v for v in variants])
    any_ublk = any(r.startswith("ublk") for r in rows)
    work = a.workdir or tempfile.mkdtemp(prefix="vm-bench-", dir=workroot())
    os.makedirs(work, exist_ok=True)
    try:
        lane.ensure_tools()
        kernel = lane.Kernel.fetch(a.kernel)
        ir = lane.Initramfs(work)
        ir.add_modules(kernel, ["loop", "nbd", "virtio_blk"] + (["ublk_drv"] if any_ublk else []))
        ir.add_build_binaries(os.path.abspath(a.build), ["daemon/rpointd", "cli/rpoint"])
        for t in ("nbd-client", "fio", "losetup", "curl") + (("nbdkit",) if a.with_nbdkit else ()):
            ir.add_binary(tool(t))
        if a.with_nbdkit:
            plugin = "/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-file-plugin.so"
            ir.add_binary(plugin, plugin)
        plan = {"BACKING": a.backing, "SIZE_MB": a.size, "RUNTIME": a.runtime,
                "ROWS": " ".join(rows), "JOBNAMES": " ".join(jobs), "ROUNDS": a.rounds}
        plan.update({"VARIANT_" + k: v for k, v in variants.items()})
        plan.update({"JOB_" + j.replace("-", "_"): JOBS[j][0] for j in jobs})
        head = "".join(f"{k}='{v}'\n" for k, v in plan.items())
        ir.add_text("/test", head + GUEST, 0o755)
        initrd = ir.build()
        disks = []
        if a.backing == "disk":
            img = os.path.join(work, "backing.img")
            subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", img, f"{a.size + 128}M"], check=True)
            disks = [img]
        load0 = loadavg()
        t0 = time.monotonic()
        started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        r = lane.run(kernel, initrd, timeout=a.timeout, disks=disks, mem=2048 + (a.size if a.backing == "ram" else 0),
                     console_log=os.path.join(work, "console.log"))
        took = time.monotonic() - t0
        load1 = loadavg()
    except lane.LaneError as e:
        print(f"vm-bench: lane failure: {e}")
        return 2
    console = r.console
    results, failures = {}, re.findall(r"@@BENCH-FAIL (.*?)@@", console)
    for rnd, row, job, body in re.findall(r"@@FIO (\d+) (\S+) (\S+)@@\n(.*?)@@FIO-END@@", console, re.S):
        try:
            results[(int(rnd), row, job)] = measure(json.loads(body[body.index("{"):]), JOBS[job][1])
        except (ValueError, KeyError, IndexError) as e:
            failures.append(f"{row} {job}: unreadable fio output ({e})")
    stats = {}
    for rnd, row, job, *vals in re.findall(r"@@STAT (\d+) (\S+) (\S+) (\S+) (\S+) (\S+) (\S+) (\S+) (\S+)@@", console):
        stats[(int(rnd), row, job)] = [float(v) for v in vals]
    if r.rc != 0 and not failures:
        failures.append(f"guest script exited {r.rc}")
    queues = re.findall(r"@@QUEUE (.*?)@@", console)
    queues += [u for u in re.findall(r"@@UP (\S+ \S.*?)@@", console)]
    queues = list(dict.fromkeys(q.strip() for q in queues))  # once each, whatever the rounds
    out = report(a, kernel, rows, jobs, results, stats, failures, load0, load1, started, took, queues)
    print(out)
    if a.out:
        with open(a.out, "w") as f:
            f.write(out)
    if failures or a.keep:
        print(f"vm-bench: console and images kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


def report(a, kernel, rows, jobs, results, stats, failures, load0, load1, started, took, queues):
    flags = ((f" --kernel {a.kernel}" if a.kernel != lane.Kernel.DEFAULT_SERIES else "") +
             f"{' --with-tcp' if a.with_tcp else ''}{' --with-nbdkit' if a.with_nbdkit else ''}"
             f"{' --with-ublk' if a.with_ublk else ''}{' --with-ublk-user-copy' if a.with_ublk_user_copy else ''}"
             + "".join(f" --ublk-variant {v!r}" for v in a.ublk_variant)
             + (f" --rounds {a.rounds}" if a.rounds > 1 else ""))
    lines = [f"## vm-bench {started} UTC", "",
             f"`bench/vm-bench.py --size {a.size}M --runtime {a.runtime} --backing {a.backing}"
             f"{flags}`, kernel {kernel.version} under qemu TCG "
             f"(`-cpu max,-cx16 -smp 2`), fio libaio O_DIRECT, {took:.0f} s. Host load average "
             f"{' '.join(load0)} at the start, {' '.join(load1)} at the end.", ""]
    busy = max(float(load0[0]), float(load1[0]))
    if busy > 3.0:
        lines += [f"**Unreliable**: the host's load average reached {busy:.1f} (2 CPUs; the VM "
                  "itself accounts for about 2): other work shared the CPUs with the guest.", ""]
    rounds = range(1, a.rounds + 1)
    if a.rounds > 1:
        lines += [f"Medians over {a.rounds} rounds in the same boot: the value, and the median "
                  "of each round's ratio to that round's loop.", ""]
    lines.append("| row | " + " | ".join(f"{j} ({JOBS[j][1]})" for j in jobs) + " |")
    lines.append("|---|" + "---|" * len(jobs))
    for row in rows:
        cells = []
        for j in jobs:
            vs = [results[(r, row, j)] for r in rounds if (r, row, j) in results]
            ratios = [results[(r, row, j)] / results[(r, "loop", j)] for r in rounds
                      if (r, row, j) in results and results.get((r, "loop", j))]
            over_nbd = [results[(r, row, j)] / results[(r, "nbd", j)] for r in rounds
                        if (r, row, j) in results and results.get((r, "nbd", j))]
            if not vs:
                cells.append("failed")
            elif row == "loop" or not ratios:
                cells.append(f"{statistics.median(vs):.0f}")
            elif row.startswith("ublk") and over_nbd:
                cells.append(f"{statistics.median(vs):.0f} ({statistics.median(ratios):.2f}x loop, "
                             f"{statistics.median(over_nbd):.1f}x nbd)")
            else:
                cells.append(f"{statistics.median(vs):.0f} ({statistics.median(ratios):.2f}x loop)")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    if a.rounds > 1:
        lines += ["", "Every round (ratio to loop in the same round):", "",
                  "| round | row | " + " | ".join(jobs) + " |", "|---|---|" + "---|" * len(jobs)]
        for r in rounds:
            for row in rows:
                cells = []
                for j in jobs:
                    v, base = results.get((r, row, j)), results.get((r, "loop", j))
                    cells.append("failed" if v is None else
                                 f"{v:.0f}" if row == "loop" or not base else f"{v:.0f} ({v / base:.2f}x)")
                lines.append(f"| {r} | {row} | " + " | ".join(cells) + " |")
    if stats:
        lines += ["", "Requests in flight (mean over the job, from time in queue) at the device and "
                  "at the backing virtio disk (vda), the guest's idle CPU, and rpointd's CPU seconds "
                  "in io_uring's io-wq workers (iou-wrk) and in the ublk queue threads; medians over "
                  "rounds:", "",
                  "| row | job | device | vda | guest idle | iou-wrk s | queue s |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for row in rows:
            for j in jobs:
                ss = [stats[(r, row, j)] for r in rounds if (r, row, j) in stats]
                if not ss:
                    continue
                m = [statistics.median(s[i] for s in ss) for i in range(6)]
                lines.append(f"| {row} | {j} | {m[0]:.1f} | {m[1]:.1f} | {m[2]:.0f}% | {m[3]:.2f} | {m[4]:.2f} |")
    if queues:
        lines += ["", "Devices: " + "; ".join(queues) + "."]
    if failures:
        lines += ["", "Failures:", ""] + [f"- {f}" for f in failures]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
