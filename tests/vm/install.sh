#!/usr/bin/env bash
# tests/vm/install.sh: makes this machine able to run the VM lane.
#   - the bookworm-backports apt source (the 6.12 cloud kernel lives there), on the
#     same Debian mirror as the machine's other sources; idempotent;
#   - qemu-system-x86, busybox-static, cpio, xz-utils, kmod (modinfo), and what the lane's
#     tests run inside the guest: nbd-client, fio (only those missing).
# Run as root (CI is); prints nothing when everything is there already.
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
need_update=0

list=/etc/apt/sources.list.d/rpointd-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  # The mirror the machine already uses for bookworm (deb822 or one-line format).
  mirror=$(grep -rhs '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null |
             awk '{print $2}' | grep -v -- '-security' | grep '/debian/\?$' | head -n 1 || true)
  if [ -z "$mirror" ]; then
    mirror=$(grep -hs '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' |
               grep -v -- '-security' | grep '/debian/\?$' | head -n 1 || true)
  fi
  [ -n "$mirror" ] || { echo "install.sh: no Debian mirror found in /etc/apt" >&2; exit 1; }
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$mirror" | $SUDO tee "$list.tmp" >/dev/null
  $SUDO mv "$list.tmp" "$list"
  need_update=1
fi
# Without lists for backports the kernel cannot be found (a fresh machine, or lists cleaned).
if ! ls /var/lib/apt/lists/ 2>/dev/null | grep -q 'bookworm-backports_main_binary-amd64_Packages'; then
  need_update=1
fi

missing=()
for p in qemu-system-x86 busybox-static cpio xz-utils kmod nbd-client fio; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((need_update || ${#missing[@]})); then
  $SUDO apt-get update -qq
fi
if ((${#missing[@]})); then
  echo "install.sh: installing ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi
