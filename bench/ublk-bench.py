#!/usr/bin/env python3
"""bench/ublk-bench.py: fio on /dev/ublkb0 served by rpointd against a kernel
loop device (losetup --direct-io=on) on the same backing file, both inside one
VM of the lane (tests/vm/lane.py: Debian's 6.12 kernel under qemu TCG), so
the ratio compares the transports under the same emulation.

The backing file lives on an ext4 virtio disk (cache=none); rpointd adopts it
with export "ublk" and io.direct on, so both sides do O_DIRECT to the same
file. Jobs: 4k randread / randwrite at QD32 and 1 MiB sequential read /
write at QD8 (fio libaio, direct=1). Prints one table; RESULTS.md keeps runs.

    ninja -C build daemon/rpointd cli/rpoint
    bench/ublk-bench.py [--runtime 10] [--smp 2] [--size 256]
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "vm"))
import lane  # noqa: E402

JOBS = [("randread-4k", "randread", "4k", 32), ("randwrite-4k", "randwrite", "4k", 32),
        ("read-1m", "read", "1M", 8), ("write-1m", "write", "1M", 8)]

GUEST = r"""
T=/tools
S=/data/state
mkdir -p /data
$T/mke2fs -q -F -t ext4 /dev/vda || exit 10
mount -t ext4 /dev/vda /data || exit 10
$T/dd if=/dev/zero of=/data/b.raw bs=1M count=@SIZE@ status=none || exit 10
sync
bench() {  # target device
  for j in @JOBS@; do
    set -- $(echo $j | tr : ' ')
    out=$($T/fio --name=$1 --filename=$TARGET --rw=$2 --bs=$3 --iodepth=$4 --ioengine=libaio \
      --direct=1 --runtime=@RUNTIME@ --time_based --ramp_time=2 --size=@SIZE@M \
      --output-format=terse --terse-version=3 2>&1 | tail -1)
    echo "@@BENCH $NAME $1 $out"
  done
}
L=$(/tools/losetup --direct-io=on --show -f /data/b.raw) || exit 11
TARGET=$L NAME=loop bench
/tools/losetup -d $L
mkdir -p $S
printf 'io:\n  direct: true\nadopt_paths: [/data]\n' >/data/rpointd.yaml
export RPOINT_SOCKET=$S/control.sock
$T/rpointd --state-dir $S --config /data/rpointd.yaml --log-level warn >/tmp/rpointd.log 2>&1 &
i=0; until $T/rpoint daemon status >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 600 ] && exit 12; sleep 0.1; done
$T/rpoint disk create b --path /data/b.raw --export ublk >/dev/null || { cat /tmp/rpointd.log; exit 13; }
i=0; while [ ! -b /dev/ublkb0 ]; do i=$((i+1)); [ $i -gt 300 ] && exit 14; sleep 0.1; done
TARGET=/dev/ublkb0 NAME=ublk bench
exit 0
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(REPO, "build"))
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--size", type=int, default=256, help="MiB")
    ap.add_argument("--smp", type=int, default=2)
    a = ap.parse_args()
    lane.ensure_tools()
    k = lane.Kernel.fetch()
    work = tempfile.mkdtemp(prefix="ublk-bench-")
    ir = lane.Initramfs(work)
    ir.add_modules(k, ["ublk_drv", "virtio_blk", "loop"])
    for b in ("daemon/rpointd", "cli/rpoint"):
        ir.add_binary(os.path.join(a.build, b))
    for t in ("/usr/bin/fio", "/usr/sbin/mke2fs", "/usr/bin/dd", "/usr/sbin/losetup"):
        ir.add_binary(t)
    jobs = " ".join(f"{n}:{rw}:{bs}:{qd}" for n, rw, bs, qd in JOBS)
    ir.add_text("/test", GUEST.replace("@JOBS@", jobs).replace("@RUNTIME@", str(a.runtime))
                .replace("@SIZE@", str(a.size)), 0o755)
    img = os.path.join(work, "data.img")
    subprocess.run(["truncate", "-s", f"{a.size + 200}M", img], check=True)
    load = os.getloadavg()[0]
    r = lane.run(k, ir.build(), timeout=120 + 8 * (a.runtime + 10) * len(JOBS), disks=[img],
                 smp=a.smp)
    rows = {}
    for m in re.finditer(r"@@BENCH (\S+) (\S+) (\S+)", r.console):
        f = m.group(3).split(";")
        if len(f) < 50:
            continue
        rd_iops, rd_bw, wr_iops, wr_bw = float(f[7]), float(f[6]), float(f[48]), float(f[47])
        write = "write" in m.group(2)
        iops, bw = (wr_iops, wr_bw) if write else (rd_iops, rd_bw)
        rows[(m.group(1), m.group(2))] = (iops, bw / 1024)
    if r.rc != 0 or not rows:
        print(r.console[-4000:])
        sys.exit(f"bench failed (rc {r.rc})")
    print(f"ublk-bench: kernel {k.version}, -smp {a.smp}, runtime {a.runtime} s, "
          f"host load {load:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print("| job | loop (IOPS / MiB/s) | ublk (IOPS / MiB/s) | ublk / loop |")
    print("|---|---|---|---|")
    for n, *_ in JOBS:
        lo, ub = rows.get(("loop", n)), rows.get(("ublk", n))
        if not lo or not ub:
            print(f"| {n} | {lo} | {ub} | - |")
            continue
        print(f"| {n} | {lo[0]:.0f} / {lo[1]:.1f} | {ub[0]:.0f} / {ub[1]:.1f} | "
              f"{ub[0] / lo[0]:.2f} |")


if __name__ == "__main__":
    main()
