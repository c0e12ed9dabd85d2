"""nbd-client and the kernel's nbd driver against rpointd, in the VM lane
(issue #11 item 3; access grants and TLS of issue #9). ./test runs it in its
`vm` stage.

One boot of Debian's 6.12 cloud kernel (tests/vm/lane.py) with rpointd, rpoint,
Debian's nbd-client 3.24 and mke2fs inside; the guest script
(tests/vm/nbd_client_guest.sh) makes an ext4 disk through /dev/nbd0, a restore
point and a disk restored from it, then attaches the restored disk over the
Unix socket, TCP and TLS, the point's read-only export, and an access grant
(over the Unix socket and TLS; revoked and expired grants must be refused),
mounting each and checking every file's sha256. The PKI (a CA, the server's
and a client's certificates, and a client certificate of another CA) is made
here with certtool and shipped in the initramfs.

Fails on any step the guest reports failed or missing, on "I/O error" or
"EXT4-fs error" in the guest's kernel log, and on a kernel oops or timeout.
Outside CI, a machine without qemu and without root to install it skips;
under CI=true that fails.
"""
import os
import re
import shutil
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BUILD = os.environ.get("RPOINTD_BUILD_DIR", os.path.join(REPO, "build"))
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))

import lane  # noqa: E402

STEPS = ["start", "make", "unix", "tcp", "tls", "point-export", "grant-unix", "grant-tls",
         "grant-revoked", "grant-expired", "tls-wrong-cert", "after-refusals", "all"]
# What the guest kernel must never log while it reads our exports.
KERNEL_READ_ERRORS = re.compile(r"I/O error|EXT4-fs error|EXT4-fs \(nbd\d+\): .*(corrupt|bad )|"
                                r"Buffer I/O error|blk_update_request")


def tool(name):
    for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        p = os.path.join(d, name)
        if os.path.exists(p):
            return p
    raise lane.LaneError(f"{name} is missing (tests/vm/install.sh installs it)")


def make_pki(root):
    """server certificate for localhost/127.0.0.1, a client certificate, and a
    client certificate signed by another CA (wrong/)."""
    from tls_pki import make_ca, make_cert

    good = root / "pki"
    make_ca(good, "rpointd lane CA")
    make_cert(good, good, "server", "localhost", 'dns_name = "localhost"\nip_address = "127.0.0.1"\n')
    make_cert(good, good, "client", "lane-client")
    other = root / "other-ca"
    make_ca(other, "some other CA")
    wrong = good / "wrong"
    wrong.mkdir()
    make_cert(other, wrong, "client", "intruder")
    for p in (good / "ca-key.pem", good / "ca.info"):
        p.unlink()
    return good


def build_initramfs(kernel, work):
    ir = lane.Initramfs(str(work))
    ir.add_modules(kernel, ["nbd"])
    ir.add_build_binaries(BUILD, ["daemon/rpointd", "cli/rpoint"])
    ir.add_binary(tool("nbd-client"))
    ir.add_binary(tool("mke2fs"))
    if os.path.exists("/etc/mke2fs.conf"):
        ir.add_file("/etc/mke2fs.conf", "/etc/mke2fs.conf")
    pki = make_pki(work)
    for dirpath, _, files in os.walk(pki):
        for f in files:
            src = os.path.join(dirpath, f)
            ir.add_file(src, "/pki/" + os.path.relpath(src, pki))
    with open(os.path.join(HERE, "nbd_client_guest.sh")) as f:
        ir.add_text("/test", f.read(), 0o755)
    return ir.build()


@pytest.mark.timeout(600)
def test_nbd_client_attaches_restored_disks_points_and_grants(tmp_path):
    if not CI and os.geteuid() != 0 and shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 missing and not root to install it (tests/vm/install.sh)")
    t0 = time.monotonic()
    lane.ensure_tools()
    kernel = lane.Kernel.fetch()
    initrd = build_initramfs(kernel, tmp_path)
    r = lane.run(kernel, initrd, timeout=480, console_log=str(tmp_path / "console.log"))
    console = r.console
    took = time.monotonic() - t0
    print(console[-12000:])
    print(f"nbd-client lane: {took:.0f} s (kernel {kernel.version})")
    fails = re.findall(r"@@FAIL (.*?)@@", console)
    assert not fails, fails
    done = re.findall(r"@@STEP (\S+) ok@@", console)
    assert done == STEPS, f"steps done {done}, expected {STEPS}; exit {r.rc}"
    assert r.rc == 0, f"guest test exited {r.rc}"
    m = re.search(r"@@DMESG@@\n(.*)@@DMESG-END@@", console, re.S)
    assert m, "the guest printed no kernel log"
    bad = [x for x in m.group(1).splitlines() if KERNEL_READ_ERRORS.search(x)]
    assert not bad, "the guest kernel logged read errors:\n" + "\n".join(bad[:20])


def test_kernel_read_error_lines_are_caught():
    """The dmesg check is not vacuous: lines the 6.12 kernel prints when an NBD
    read or write fails, or ext4 finds damage, match; the lane's normal
    attach/detach lines do not."""
    bad = ["[   51.2] I/O error, dev nbd0, sector 2048 op 0x0:(READ) flags 0x80700 phys_seg 1 prio class 2",
           "[   51.3] Buffer I/O error on dev nbd0, logical block 0, async page read",
           "[   52.0] EXT4-fs error (device nbd0): ext4_find_entry:1455: inode #2: comm ls: "
           "reading directory lblock 0"]
    good = ["[   23.8] nbd0: detected capacity change from 0 to 131072",
            "[   30.0] EXT4-fs (nbd0): mounted filesystem 339f7c5c r/w with ordered data mode.",
            "[   35.4] block nbd0: NBD_DISCONNECT",
            "[   35.4] block nbd0: Disconnected due to user request.",
            "[   35.4] block nbd0: shutting down sockets"]
    assert all(KERNEL_READ_ERRORS.search(x) for x in bad)
    assert not any(KERNEL_READ_ERRORS.search(x) for x in good)
