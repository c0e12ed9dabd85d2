# Guest side of tests/vm/test_nbd_client.py (busybox sh inside the VM lane).
#
# rpointd runs inside the guest (state on the guest's tmpfs, NBD on its Unix
# socket and on 127.0.0.1:10809 with TLS allowed, X.509 from /pki with client
# certificates required). The kernel's nbd driver is the client, attached with
# Debian's nbd-client 3.24 (netlink):
#   1. disk `src` over the Unix socket: mkfs.ext4, files, their sha256sums;
#      restore point c/p1; disk `rs` restored from it.
#   2. `rs` over the Unix socket, plain TCP and TLS; c/p1/src (the point's own
#      read-only export) over the Unix socket: mount, sha256sum -c, umount,
#      nbd-client -d, attachedClients back to 0.
#   3. an access grant (rpoint access grant, its nbd-client arguments) over the
#      Unix socket and over TLS; then revoked, and another one expired: nbd-client
#      must fail to attach.
#   4. a client certificate of another CA: refused.
# Each step prints "@@STEP name ok@@"; a failure prints "@@FAIL name: why@@" and
# exits non-zero. The host also fails the run on "I/O error" / "EXT4-fs error"
# in the kernel log (printed between @@DMESG@@ markers at the end).
set -u
T=/tools
S=/tmp/state
SOCK=$S/nbd.sock
PORT=10809
TLS="-certfile /pki/client-cert.pem -keyfile /pki/client-key.pem -cacertfile /pki/ca-cert.pem -tlshostname localhost"
WRONG_TLS="-certfile /pki/wrong/client-cert.pem -keyfile /pki/wrong/client-key.pem -cacertfile /pki/ca-cert.pem -tlshostname localhost"
export RPOINT_SOCKET=$S/control.sock

fail() {
  echo "@@FAIL $1: $2@@"
  echo "---- rpointd log (tail)"; tail -n 30 /tmp/rpointd.log
  echo "---- dmesg (tail)"; dmesg | tail -n 30
  exit 1
}
ok() { echo "@@STEP $1 ok@@"; }

# attachedClients of disk $1 (from GET /disks/{d}).
clients() {
  $T/rpoint -o json disk show "$1" | tr -d ' \n' | sed -n 's/.*"attachedClients":\([0-9]*\).*/\1/p'
}

# Waits until /dev/nbd0 has a size (the kernel saw the connection), 10 s.
wait_attached() {
  i=0
  while [ "$(cat /sys/block/nbd0/size 2>/dev/null || echo 0)" = 0 ]; do
    i=$((i + 1)); [ $i -gt 100 ] && return 1
    sleep 0.1
  done
}

# Detaches /dev/nbd0 and waits until the kernel and (for a disk) rpointd agree.
detach() { # step [disk]
  $T/nbd-client -d /dev/nbd0 || fail "$1" "nbd-client -d exited $?"
  i=0
  while [ "$(cat /sys/block/nbd0/size)" != 0 ] || $T/nbd-client -c /dev/nbd0 >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -gt 100 ] && fail "$1" "/dev/nbd0 still attached 10 s after nbd-client -d"
    sleep 0.1
  done
  if [ -n "${2:-}" ]; then
    i=0
    while [ "$(clients "$2")" != 0 ]; do
      i=$((i + 1)); [ $i -gt 100 ] && fail "$1" "disk $2: attachedClients $(clients "$2") 10 s after nbd-client -d"
      sleep 0.1
    done
  fi
}

# Mounts /dev/nbd0 (options $2), checks every file, unmounts.
check_files() { # step mount-options
  mount -t ext4 -o "$2" /dev/nbd0 /mnt || fail "$1" "mount -o $2 failed"
  (cd /mnt && sha256sum -c -s /tmp/sums) || { umount /mnt; fail "$1" "checksums differ"; }
  umount /mnt || fail "$1" "umount failed"
}

# attach-and-check: step disk-for-clients mount-options nbd-client-args...
attach_check() {
  step=$1 disk=$2 opts=$3
  shift 3
  $T/nbd-client "$@" /dev/nbd0 >/tmp/nbd-client.out 2>&1 || { cat /tmp/nbd-client.out; fail "$step" "nbd-client exited $?"; }
  wait_attached || fail "$step" "/dev/nbd0 got no size"
  if [ -n "$disk" ]; then
    c=$(clients "$disk")
    [ "$c" = 1 ] || fail "$step" "disk $disk: attachedClients $c while attached, expected 1"
  fi
  # A read-only export (NBD_FLAG_READ_ONLY) makes a read-only block device.
  case "$opts" in ro*) [ "$(cat /sys/block/nbd0/ro)" = 1 ] || fail "$step" "/dev/nbd0 is writable" ;; esac
  check_files "$step" "$opts"
  detach "$step" "$disk"
  ok "$step"
}

# nbd-client must fail for the reason given (a grep -E pattern of its output,
# or "log:PATTERN" for rpointd's log) and leave /dev/nbd0 unattached.
attach_refused() { # step why nbd-client-args...
  step=$1 why=$2
  shift 2
  if $T/nbd-client "$@" /dev/nbd0 >/tmp/nbd-client.out 2>&1; then
    $T/nbd-client -d /dev/nbd0 >/dev/null 2>&1
    fail "$step" "nbd-client attached ($(cat /tmp/nbd-client.out))"
  fi
  $T/nbd-client -c /dev/nbd0 >/dev/null 2>&1 && fail "$step" "/dev/nbd0 is attached after a refusal"
  case "$why" in
    log:*) grep -Eq "${why#log:}" /tmp/rpointd.log || fail "$step" "rpointd logged no '${why#log:}'" ;;
    *) grep -Eq "$why" /tmp/nbd-client.out || fail "$step" "refused, but not with '$why': $(cat /tmp/nbd-client.out)" ;;
  esac
  echo "$step: nbd-client refused as expected: $(tr '\n' ' ' </tmp/nbd-client.out)"
  ok "$step"
}

ip link set lo up || ifconfig lo 127.0.0.1 up
mkdir -p $S /mnt
cat >/tmp/rpointd.yaml <<EOF
nbd:
  tcp: "127.0.0.1:$PORT"
  tls: allow
tls:
  dir: /pki
EOF
$T/rpointd --state-dir $S --config /tmp/rpointd.yaml --log-level info >/tmp/rpointd.log 2>&1 &
i=0
until $T/rpoint daemon status >/dev/null 2>&1 && [ -S $SOCK ]; do
  i=$((i + 1)); [ $i -gt 600 ] && fail start "rpointd did not start"
  sleep 0.1
done
ok start

# 1. A filesystem made through the kernel's nbd client, a point, a restored disk.
$T/rpoint disk create src --size 64M >/dev/null || fail make "disk create"
$T/rpoint vm create vm --disk src >/dev/null || fail make "vm create"
$T/rpoint collection create c --vm vm >/dev/null || fail make "collection create"
$T/nbd-client -unix $SOCK -N src /dev/nbd0 >/tmp/nbd-client.out 2>&1 || { cat /tmp/nbd-client.out; fail make "nbd-client src"; }
wait_attached || fail make "/dev/nbd0 got no size"
$T/mke2fs -q -F -t ext4 /dev/nbd0 || fail make "mke2fs"
mount -t ext4 /dev/nbd0 /mnt || fail make "mount"
mkdir -p /mnt/dir
dd if=/dev/urandom of=/mnt/big bs=1M count=8 2>/dev/null
for n in 1 2 3 4 5 6 7 8; do dd if=/dev/urandom of=/mnt/dir/f$n bs=4k count=$n 2>/dev/null; done
echo "rpointd nbd-client lane" >/mnt/hello.txt
(cd /mnt && sha256sum big hello.txt dir/*) >/tmp/sums
umount /mnt || fail make "umount"
detach make src
$T/rpoint restore-point create c/p1 --wait >/dev/null || fail make "restore-point create"
$T/rpoint disk create rs --from c/p1/src --wait >/dev/null || fail make "disk create --from"
echo "files: $(wc -l </tmp/sums)"
ok make

# 2. The restored disk over each transport, the point's own export read-only.
attach_check unix rs rw -unix $SOCK -N rs
attach_check tcp rs rw 127.0.0.1 $PORT -N rs
attach_check tls rs rw 127.0.0.1 $PORT -N rs $TLS
attach_check point-export "" ro,noload -unix $SOCK -N c/p1/src

# 3. Access grants.
URI=$($T/rpoint access grant c/p1/src --duration 1h --listener unix) || fail grant "access grant"
case "$URI" in nbd+unix:///*\?socket=$SOCK) ;; *) fail grant "unexpected URI shape: $URI" ;; esac
ARGS=$($T/rpoint access grant c/p1/src --duration 1h --listener unix --nbd-client) || fail grant "access grant --nbd-client"
TOKEN=$(echo "$URI" | sed 's|^nbd+unix:///\([0-9a-f]*\)?.*|\1|')
[ "$ARGS" = "-N $TOKEN -unix $SOCK" ] || fail grant "--nbd-client printed '$ARGS', expected '-N $TOKEN -unix $SOCK'"
# shellcheck disable=SC2086
attach_check grant-unix "" ro,noload $ARGS
TARGS=$($T/rpoint access grant c/p1/src --duration 1h --listener tcp --nbd-client) || fail grant "tcp grant"
# The TCP listener speaks TLS (allow): an nbds:// grant, so -enable-tls.
[ "$TARGS" = "-N $TOKEN 127.0.0.1 $PORT -enable-tls" ] || fail grant-tls "tcp --nbd-client printed '$TARGS'"
# shellcheck disable=SC2086
attach_check grant-tls "" ro,noload $TARGS $TLS
$T/rpoint access revoke c/p1/src >/dev/null || fail grant-revoked "access revoke"
attach_refused grant-revoked "unknown, expired or revoked access token" -unix $SOCK -N "$TOKEN"
SHORT=$($T/rpoint access grant c/p1/src --duration 2s --listener unix --nbd-client) || fail grant-expired "access grant 2s"
[ "$SHORT" != "$ARGS" ] || fail grant-expired "a new grant after revoke reused the token"
sleep 3
# shellcheck disable=SC2086
attach_refused grant-expired "unknown, expired or revoked access token" $SHORT

# 4. A client certificate signed by another CA.
attach_refused tls-wrong-cert "log:TLS handshake failed" 127.0.0.1 $PORT -N rs $WRONG_TLS
attach_check after-refusals rs rw -unix $SOCK -N rs

echo "@@DMESG@@"
dmesg
echo "@@DMESG-END@@"
$T/rpoint daemon status >/dev/null || fail end "rpointd not answering at the end"
ok all
