"""ublk in the VM lane (issue #11): rpointd serves disks as /dev/ublkbN
inside Debian's 6.12 kernel under qemu (lane.py), one boot for all parts.
RPOINTD_VM_KERNEL=6.17 boots the 6.17 kernel of trixie-backports instead,
where the default `ublk.zero_copy: auto` makes every new device zero copy
(UBLK_F_AUTO_BUF_REG): d0 is then in zero copy mode, not buffer mode, and
every part runs over it (the CI lane stays 6.12: the copy path).

1. points over ublk: mkfs.ext4 on /dev/ublkb0, files with known checksums,
   a restore point, changes, a second point; disks restored from each point
   are served over ublk too and mounted read-only: each shows the checksums
   of its state. A restored disk deleted: its /dev/ublkbN goes away.
2. recovery: kill -9 of rpointd under a dd write load (O_DIRECT) on the
   mounted ublk disk, rpointd restarted: the same /dev/ublkb0 comes back
   (USER_RECOVERY), dd ends without an I/O error, the kernel logged none,
   e2fsck -fn is clean, and the next restore point, restored, equals the
   disk byte for byte (cmp).

3. SIGTERM (a service restart) keeps /dev/ublkb0, mounted: the next
   rpointd takes it over, files read back through the device.
4. DELETE of a ublk disk whose device is mounted: 409 naming the device,
   the device and its filesystem untouched; after umount the delete works.

5. copy modes: d0 was made in buffer mode (the default on 6.12, the
   driver's copy; zero copy on 6.17);
   restarted with `ublk.user_copy: true`, `ublk.zero_copy: off` (and `ublk.taskrun: defer`, so the
   load below runs on SINGLE_ISSUER + DEFER_TASKRUN rings, the other parts
   on the default plain ones) rpointd recovers d0 still in buffer mode and makes a new disk b0 with UBLK_F_USER_COPY (6.12 has it); kill -9
   under a write load on b0, restart with the default config: b0 comes back
   in user copy mode, dd ends without error,
   e2fsck is clean, a point of b0 equals the device (cmp).
6. requests the engine cannot do with O_DIRECT (512-byte aligned, not 4 KiB:
   served through the buffered descriptor; with zero copy still from the
   request's own pages, through the ring): O_DIRECT dd of 512-byte blocks at
   an odd offset on a new disk u0 reads back equal, and a point of u0
   equals the device. Then `ublk.zero_copy: on`: on 6.12 a new disk is
   refused with the reason (no UBLK_F_AUTO_BUF_REG); on 6.17 it is zero copy.

Part 1 also checks the API: devicePath and state Live in GET, and the NBD
export of a ublk disk marked read-only.

Outside CI, a machine without qemu and without root (tests/vm/install.sh)
skips; under CI=true that fails (conftest.py's rule, repeated here).
"""
import os
import re
import shutil
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BUILD = os.environ.get("RPOINTD_BUILD_DIR", os.path.join(REPO, "build"))
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
sys.path.insert(0, HERE)
import lane  # noqa: E402

pytestmark = pytest.mark.timeout(600)

# Host tools the guest runs (busybox applets shadow PATH: called as /tools/x).
TOOLS = ["/usr/sbin/mke2fs", "/usr/sbin/e2fsck", "/usr/bin/dd", "/usr/bin/cmp"]
SMP = int(os.environ.get("RPOINTD_VM_SMP", "2"))

GUEST = r"""
T=/tools
S=/tmp/state
L=/tmp/rpointd.log
export RPOINT_SOCKET=$S/control.sock
fail() { echo "UBLK-FAIL: $*"; echo "--- rpointd log"; tail -40 $L; echo "--- dmesg"; dmesg | tail -30; exit 1; }
start_rpointd() {  # extra arguments: rpointd's (e.g. --config F)
  wc -l <$L >/tmp/logmark 2>/dev/null || echo 0 >/tmp/logmark
  $T/rpointd --state-dir $S "$@" --log-level info >>$L 2>&1 &
  echo $! >/tmp/rpointd.pid
  i=0
  until $T/rpoint daemon status >/dev/null 2>&1; do
    i=$((i+1)); [ $i -gt 600 ] && fail "rpointd did not start"
    sleep 0.1
  done
}
# What the rpointd started last has logged.
newlog() { tail -n +$(( $(cat /tmp/logmark) + 1 )) $L; }
wait_dev() { i=0; while [ ! -b $1 ]; do i=$((i+1)); [ $i -gt 300 ] && fail "$1 did not appear"; sleep 0.1; done; }
field() { $T/rpoint --output json disk show $1 | tr -d ' \n' | sed -n "s/.*\"$2\":\([^,}]*\).*/\1/p" | tr -d '"'; }
mkdir -p $S /mnt/a /mnt/r
printf 'queues: %s\n' "$(nproc)" >/dev/null
start_rpointd
echo "@@UBLK-UP@@"

# ---- 1: points over ublk ----
$T/rpoint disk create d0 --size 96M --export ublk >/tmp/out 2>&1 || { cat /tmp/out; fail "create d0"; }
wait_dev /dev/ublkb0
[ "$(field d0 devicePath)" = /dev/ublkb0 ] || fail "d0 devicePath is $(field d0 devicePath)"
[ "$(field d0 state)" = Live ] || fail "d0 state is $(field d0 state)"
$T/rpoint disk show d0 | grep -q 'NBD export.*read-only' || fail "NBD export of a ublk disk not read-only"
# The default is buffer mode on 6.12 (ublk.user_copy: false): the driver copies
# the data; zero copy on 6.17 (ublk.zero_copy: auto).
newlog | grep -q "ublk 0: /dev/ublkb0 serves disk d0 .*$D0_MODE copy" || fail "d0 is not in $D0_MODE copy mode"
[ "$(field d0 copyMode)" = "$D0_MODE" ] || fail "d0 copyMode is $(field d0 copyMode), not $D0_MODE"
# The default rings (ublk.taskrun: plain).
newlog | grep -q 'ublk 0: /dev/ublkb0 serves disk d0 .*plain rings' || fail "d0's queues are not on plain rings"
$T/mke2fs -q -F -t ext4 /dev/ublkb0 || fail "mkfs.ext4"
mount -t ext4 /dev/ublkb0 /mnt/a || fail "mount d0"
C=7; for f in f1 f2 f3; do C=$((C+9)); $T/dd if=/dev/urandom of=/mnt/a/$f bs=64k count=$C status=none || fail "write $f"; done
mkdir /mnt/a/sub && $T/dd if=/dev/urandom of=/mnt/a/sub/f4 bs=4k count=300 status=none
(cd /mnt/a && sha256sum f1 f2 f3 sub/f4 >/tmp/sums1)
$T/rpoint vm create vm --disk d0 >/dev/null || fail "vm create"
$T/rpoint collection create c --vm vm >/dev/null || fail "collection create"
# Frozen: the journal is checkpointed, so the point holds a clean filesystem.
fsfreeze --freeze /mnt/a || fail "fsfreeze"
$T/rpoint restore-point create c/p1 --wait >/tmp/out 2>&1 || { fsfreeze --unfreeze /mnt/a; cat /tmp/out; fail "point p1"; }
fsfreeze --unfreeze /mnt/a
$T/dd if=/dev/urandom of=/mnt/a/f1 bs=64k count=5 conv=notrunc status=none
rm /mnt/a/f2
$T/dd if=/dev/urandom of=/mnt/a/f5 bs=64k count=20 status=none
(cd /mnt/a && sha256sum f1 f3 f5 sub/f4 >/tmp/sums2)
fsfreeze --freeze /mnt/a
$T/rpoint restore-point create c/p2 --wait >/tmp/out 2>&1 || { fsfreeze --unfreeze /mnt/a; cat /tmp/out; fail "point p2"; }
fsfreeze --unfreeze /mnt/a
for n in 1 2; do
  $T/rpoint disk create r$n --from c/p$n/d0 --wait --export ublk >/tmp/out 2>&1 || { cat /tmp/out; fail "restore r$n"; }
  dev=$(field r$n devicePath)
  wait_dev $dev
  mount -t ext4 -o ro $dev /mnt/r || fail "mount r$n ($dev)"
  (cd /mnt/r && sha256sum -c /tmp/sums$n) || fail "r$n: checksums of p$n differ"
  [ "$n" = 2 ] || [ ! -e /mnt/r/f5 ] || fail "r1 has f5"
  umount /mnt/r
  $T/rpoint disk delete r$n >/dev/null || fail "delete r$n"
  i=0; while [ -b $dev ]; do i=$((i+1)); [ $i -gt 100 ] && fail "$dev still there after delete"; sleep 0.1; done
done
echo "@@UBLK-1 ok@@"

# ---- 2: kill -9 under a write load, recovery ----
$T/dd if=/dev/urandom of=/tmp/pattern bs=1M count=24 status=none
# The load is 384 direct 64 KiB writes, one dd each, so it lasts far longer
# than it takes to see it start, however fast the machine (a single 24 MiB dd
# and a fixed sleep raced: on a quiet host it ended before the kill).
( rc=0; i=0
  while [ $i -lt 384 ]; do
    $T/dd if=/tmp/pattern of=/mnt/a/load bs=64k skip=$i seek=$i count=1 oflag=direct conv=notrunc,fsync status=none || { rc=$?; break; }
    i=$((i+1))
  done
  echo $rc >/tmp/dd.rc ) &
i=0; while [ "$(stat -c %s /mnt/a/load 2>/dev/null || echo 0)" -lt 524288 ]; do
  i=$((i+1)); [ $i -gt 1200 ] && fail "the write load did not start"; sleep 0.05
done
[ -e /tmp/dd.rc ] && fail "the write load ended before the kill"
kill -9 $(cat /tmp/rpointd.pid)
echo "killed rpointd"
sleep 1
start_rpointd
[ "$(field d0 devicePath)" = /dev/ublkb0 ] || fail "after restart d0 is $(field d0 devicePath)"
i=0; while [ ! -e /tmp/dd.rc ]; do i=$((i+1)); [ $i -gt 1200 ] && fail "dd did not finish"; sleep 0.1; done
[ "$(cat /tmp/dd.rc)" = 0 ] || fail "dd under kill -9 exited $(cat /tmp/dd.rc)"
cmp /tmp/pattern /mnt/a/load || fail "the file written across the kill differs"
[ "$(field d0 state)" = Live ] || fail "d0 state after recovery is $(field d0 state)"
(cd /mnt/a && sha256sum -c /tmp/sums2 >/dev/null) || fail "files of before the kill changed"
umount /mnt/a || fail "umount"
dmesg | grep -E 'I/O error|EXT4-fs error|Buffer I/O' && fail "the kernel logged I/O errors"
$T/e2fsck -fn /dev/ublkb0 || fail "e2fsck -fn after recovery"
$T/rpoint restore-point create c/p3 --wait >/tmp/out 2>&1 || { cat /tmp/out; fail "point p3"; }
$T/rpoint disk create r3 --from c/p3/d0 --wait >/tmp/out 2>&1 || { cat /tmp/out; fail "restore r3"; }
cmp /dev/ublkb0 $S/disks/r3.raw || fail "point p3 differs from the disk"
echo "@@UBLK-2 ok@@"
$T/rpoint disk show d0

# ---- 3: SIGTERM keeps the device (a service restart); the next start takes it over ----
mount -t ext4 /dev/ublkb0 /mnt/a || fail "remount d0"
pid=$(cat /tmp/rpointd.pid)
kill $pid
wait $pid || fail "rpointd exited $? on SIGTERM"
[ -b /dev/ublkb0 ] || fail "SIGTERM removed /dev/ublkb0"
start_rpointd
[ "$(field d0 devicePath)" = /dev/ublkb0 ] || fail "after SIGTERM and start: $(field d0 devicePath)"
[ "$(field d0 state)" = Live ] || fail "after SIGTERM and start: $(field d0 state)"
sync; echo 3 >/proc/sys/vm/drop_caches
(cd /mnt/a && sha256sum -c /tmp/sums2 >/dev/null) || fail "files after the SIGTERM restart"
cmp /tmp/pattern /mnt/a/load || fail "load file after the SIGTERM restart"
umount /mnt/a || fail "umount after the SIGTERM restart"
dmesg | grep -E 'I/O error|EXT4-fs error|Buffer I/O' && fail "the kernel logged I/O errors"
echo "@@UBLK-3 ok@@"

# ---- 4: DELETE of a mounted ublk disk is refused (409), the device stays ----
$T/rpoint disk create e0 --size 16M --export ublk >/tmp/out 2>&1 || { cat /tmp/out; fail "create e0"; }
dev=$(field e0 devicePath)
wait_dev $dev
$T/mke2fs -q -F -t ext4 $dev || fail "mkfs.ext4 on e0"
mount -t ext4 $dev /mnt/r || fail "mount e0"
$T/dd if=/dev/urandom of=/mnt/r/g bs=64k count=8 status=none && (cd /mnt/r && sha256sum g >/tmp/sums4)
$T/rpoint disk delete e0 >/tmp/out 2>&1 && fail "delete of mounted e0 succeeded"
cat /tmp/out
grep -q "409" /tmp/out || fail "delete of mounted e0: not a 409"
grep -q "$dev is in use" /tmp/out || fail "delete of mounted e0: no clear reason"
[ -b $dev ] || fail "$dev gone after a refused delete"
[ "$(field e0 state)" = Live ] || fail "e0 state after the refused delete is $(field e0 state)"
sync; echo 3 >/proc/sys/vm/drop_caches
(cd /mnt/r && sha256sum -c /tmp/sums4 >/dev/null) || fail "e0 files after the refused delete"
umount /mnt/r || fail "umount e0"
$T/rpoint disk delete e0 >/dev/null || fail "delete of unmounted e0"
i=0; while [ -b $dev ]; do i=$((i+1)); [ $i -gt 100 ] && fail "$dev still there after delete"; sleep 0.1; done
dmesg | grep -E 'I/O error|EXT4-fs error|Buffer I/O' && fail "the kernel logged I/O errors"
echo "@@UBLK-4 ok@@"

# ---- 5: user copy (ublk.user_copy: true, UBLK_F_USER_COPY, 6.5+);
# a recovered device keeps the copy mode it was made with, whatever the config ----
pid=$(cat /tmp/rpointd.pid)
kill $pid
wait $pid || fail "rpointd exited $? on SIGTERM (part 5)"
printf 'ublk: {user_copy: true, zero_copy: "off", taskrun: defer}\n' >/tmp/usercopy.yaml
start_rpointd --config /tmp/usercopy.yaml
newlog | grep -q "recovered /dev/ublkb0 for disk d0 .*$D0_MODE copy" || fail "d0 not recovered in $D0_MODE copy mode"
# The ring mode is the running config's, not the device's.
newlog | grep -q 'recovered /dev/ublkb0 for disk d0 .*defer rings' || fail "d0 not recovered on defer rings"
mount -t ext4 /dev/ublkb0 /mnt/a || fail "mount d0 (part 5)"
(cd /mnt/a && sha256sum -c /tmp/sums2 >/dev/null) || fail "d0 files, recovered under user_copy: true"
umount /mnt/a
$T/rpoint disk create b0 --size 64M --export ublk >/tmp/out 2>&1 || { cat /tmp/out; fail "create b0"; }
dev=$(field b0 devicePath)
wait_dev $dev
newlog | grep -q "${dev#/dev/}.* serves disk b0 .*user copy" || fail "b0 is not in user copy mode"
newlog | grep -q "${dev#/dev/}.* serves disk b0 .*defer rings" || fail "b0 is not on defer rings"
$T/mke2fs -q -F -t ext4 $dev || fail "mkfs.ext4 on b0"
mount -t ext4 $dev /mnt/r || fail "mount b0"
$T/dd if=/dev/urandom of=/mnt/r/h bs=1M count=6 status=none && (cd /mnt/r && sha256sum h >/tmp/sums5)
( rc=0; i=0
  while [ $i -lt 384 ]; do
    $T/dd if=/tmp/pattern of=/mnt/r/load bs=64k skip=$i seek=$i count=1 oflag=direct conv=notrunc,fsync status=none || { rc=$?; break; }
    i=$((i+1))
  done
  echo $rc >/tmp/dd5.rc ) &
i=0; while [ "$(stat -c %s /mnt/r/load 2>/dev/null || echo 0)" -lt 524288 ]; do
  i=$((i+1)); [ $i -gt 1200 ] && fail "the b0 write load did not start"; sleep 0.05
done
[ -e /tmp/dd5.rc ] && fail "the b0 write load ended before the kill"
kill -9 $(cat /tmp/rpointd.pid)
sleep 1
start_rpointd
newlog | grep -q "recovered $dev for disk b0 .*user copy" || fail "b0 not recovered in user copy mode"
i=0; while [ ! -e /tmp/dd5.rc ]; do i=$((i+1)); [ $i -gt 1200 ] && fail "b0 dd did not finish"; sleep 0.1; done
[ "$(cat /tmp/dd5.rc)" = 0 ] || fail "b0 dd under kill -9 exited $(cat /tmp/dd5.rc)"
cmp /tmp/pattern /mnt/r/load || fail "b0: the file written across the kill differs"
sync; echo 3 >/proc/sys/vm/drop_caches
(cd /mnt/r && sha256sum -c /tmp/sums5 >/dev/null) || fail "b0 files after recovery"
umount /mnt/r || fail "umount b0"
dmesg | grep -E 'I/O error|EXT4-fs error|Buffer I/O' && fail "the kernel logged I/O errors"
$T/e2fsck -fn $dev || fail "e2fsck -fn of b0"
$T/rpoint vm create vmb --disk b0 >/dev/null || fail "vm create vmb"
$T/rpoint collection create cb --vm vmb >/dev/null || fail "collection create cb"
$T/rpoint restore-point create cb/q1 --wait >/tmp/out 2>&1 || { cat /tmp/out; fail "point q1"; }
$T/rpoint disk create rb --from cb/q1/b0 --wait >/tmp/out 2>&1 || { cat /tmp/out; fail "restore rb"; }
cmp $dev $S/disks/rb.raw || fail "point q1 differs from b0"
echo "@@UBLK-5 ok@@"

# ---- 6: 512-byte O_DIRECT requests (the buffered descriptor), then zero_copy: on ----
$T/rpoint disk create u0 --size 16M --export ublk >/tmp/out 2>&1 || { cat /tmp/out; fail "create u0"; }
dev=$(field u0 devicePath)
wait_dev $dev
newlog | grep -q "${dev#/dev/}.* serves disk u0 .*$D0_MODE copy" || fail "u0 is not in $D0_MODE copy mode"
$T/dd if=/tmp/pattern of=/tmp/p6 bs=512 count=2047 status=none
$T/dd if=/tmp/p6 of=$dev bs=512 seek=1 oflag=direct conv=fsync status=none || fail "512-byte direct writes to u0"
$T/dd if=$dev of=/tmp/r6 bs=512 skip=1 count=2047 iflag=direct status=none || fail "512-byte direct reads of u0"
cmp /tmp/p6 /tmp/r6 || fail "u0: 512-byte direct I/O read back differs"
$T/dd if=$dev of=/tmp/r6b bs=3584 skip=0 count=300 iflag=direct status=none || fail "3.5 KiB direct reads of u0"
$T/dd if=/tmp/r6b of=/tmp/r6c bs=512 skip=1 count=2047 status=none
cmp /tmp/p6 /tmp/r6c || fail "u0: 3.5 KiB direct reads differ"
$T/rpoint vm create vmu --disk u0 >/dev/null || fail "vm create vmu"
$T/rpoint collection create cu --vm vmu >/dev/null || fail "collection create cu"
$T/rpoint restore-point create cu/s1 --wait >/tmp/out 2>&1 || { cat /tmp/out; fail "point s1"; }
$T/rpoint disk create ru --from cu/s1/u0 --wait >/tmp/out 2>&1 || { cat /tmp/out; fail "restore ru"; }
cmp $dev $S/disks/ru.raw || fail "point s1 differs from u0"
dmesg | grep -E 'I/O error|Buffer I/O' && fail "the kernel logged I/O errors"
pid=$(cat /tmp/rpointd.pid)
kill $pid
wait $pid || fail "rpointd exited $? on SIGTERM (part 6)"
printf 'ublk: {zero_copy: "on"}\n' >/tmp/zc.yaml
start_rpointd --config /tmp/zc.yaml
if [ "$D0_MODE" = zero ]; then
  $T/rpoint disk create z0 --size 16M --export ublk >/tmp/out 2>&1 || { cat /tmp/out; fail "create z0 (zero_copy: on)"; }
  dev=$(field z0 devicePath)
  wait_dev $dev
  [ "$(field z0 copyMode)" = zero ] || fail "z0 copyMode is $(field z0 copyMode)"
  $T/dd if=/tmp/pattern of=$dev bs=1M count=8 oflag=direct status=none || fail "z0 writes"
  $T/dd if=$dev of=/tmp/r6z bs=1M count=8 iflag=direct status=none || fail "z0 reads"
  $T/dd if=/tmp/pattern of=/tmp/p6z bs=1M count=8 status=none
  cmp /tmp/p6z /tmp/r6z || fail "z0 read back differs"
else
  $T/rpoint disk create z0 --size 16M --export ublk >/tmp/out 2>&1
  cat /tmp/out
  [ "$(field z0 state)" = Live ] && fail "z0 is served although zero_copy is on and the kernel has none"
  grep -q 'UBLK_F_AUTO_BUF_REG' /tmp/out $L || fail "z0: the refusal does not say why"
fi
echo "@@UBLK-6 ok@@"
kill $(cat /tmp/rpointd.pid)
exit 0
"""


@pytest.fixture(scope="module")
def boot(tmp_path_factory):
    if not CI and os.geteuid() != 0 and shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 missing and not root to install it (tests/vm/install.sh)")
    lane.ensure_tools()
    series = os.environ.get("RPOINTD_VM_KERNEL", lane.Kernel.DEFAULT_SERIES)
    k = lane.Kernel.fetch(series)
    work = str(tmp_path_factory.mktemp("ublk"))
    ir = lane.Initramfs(work)
    ir.add_modules(k, ["ublk_drv"])
    for b in ("daemon/rpointd", "cli/rpoint"):
        p = os.path.join(BUILD, b)
        if not os.path.exists(p):
            raise lane.LaneError(f"{p} is missing: build first (ninja -C {BUILD})")
        ir.add_binary(p)
    for t in TOOLS:
        ir.add_binary(t)
    if os.path.exists("/etc/mke2fs.conf"):
        ir.add_file("/etc/mke2fs.conf", "/etc/mke2fs.conf")
    # The copy mode a new device gets by default: zero copy from 6.16 on.
    mode = "zero" if [int(x) for x in series.split(".")] >= [6, 16] else "buffer"
    ir.add_text("/test", f"D0_MODE={mode}\n" + GUEST, 0o755)
    r = lane.run(k, ir.build(), timeout=420, smp=SMP, console_log=os.path.join(work, "console"))
    print(r.console[-6000:])
    return r


def test_ublk_points_restored_over_ublk(boot):
    assert "@@UBLK-UP@@" in boot.console, boot.console[-4000:]
    assert "@@UBLK-1 ok@@" in boot.console, _failure(boot)


def test_ublk_kill9_under_load_recovers(boot):
    assert "@@UBLK-1 ok@@" in boot.console, "part 1 failed first"
    assert "@@UBLK-2 ok@@" in boot.console and boot.rc == 0, _failure(boot)


def test_ublk_sigterm_keeps_device_for_the_next_start(boot):
    assert "@@UBLK-2 ok@@" in boot.console, "part 2 failed first"
    assert "@@UBLK-3 ok@@" in boot.console and boot.rc == 0, _failure(boot)


def test_ublk_delete_of_a_mounted_disk_is_refused(boot):
    assert "@@UBLK-3 ok@@" in boot.console, "part 3 failed first"
    assert "@@UBLK-4 ok@@" in boot.console and boot.rc == 0, _failure(boot)


def test_ublk_buffer_copy_and_modes_kept_across_recovery(boot):
    assert "@@UBLK-4 ok@@" in boot.console, "part 4 failed first"
    assert "@@UBLK-5 ok@@" in boot.console and boot.rc == 0, _failure(boot)


def test_ublk_unaligned_direct_io_and_zero_copy_on(boot):
    assert "@@UBLK-5 ok@@" in boot.console, "part 5 failed first"
    assert "@@UBLK-6 ok@@" in boot.console and boot.rc == 0, _failure(boot)


def _failure(r):
    m = re.search(r"UBLK-FAIL: .*", r.console)
    return (m.group(0) if m else f"rc={r.rc}") + "\n" + r.console[-5000:]
