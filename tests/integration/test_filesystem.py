"""A real ext4 filesystem on an rpointd disk, through the kernel.

The export is mounted with nbdfuse (the kernel here has no nbd module), the FUSE
file attached to a loop device, formatted and mounted. Files with known
checksums must come back intact after unmount + daemon restart, and, for what
was synced, after a kill -9 of the daemon under a mounted filesystem (journal
replay on the next mount).

Needs root (losetup, mount) and /dev/fuse; skips otherwise.
"""
import contextlib
import hashlib
import os
import random
import subprocess
import time

import pytest

from conftest import require

MiB = 1 << 20
DISK_SIZE = 256 * MiB


def run(*cmd, check=True, timeout=120):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n"
                             f"{r.stdout}\n{r.stderr}")
    return r


def mounted(path):
    """True if `path` is a mount point, also for a FUSE mount whose server died
    (os.path.ismount() stats the path, which then fails with ENOTCONN)."""
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # Field 5 is the mount point, with space, tab, newline, backslash octal-escaped.
            mp = line.split()[4]
            mp = (mp.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
                  .replace("\\134", "\\"))
            if mp == path:
                return True
    return False


@pytest.fixture(autouse=True)
def _needs_kernel_stack():
    require("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount")
    if os.geteuid() != 0:
        pytest.skip("needs root for losetup and mount")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no loop device support")


class BlockStack:
    """export -> nbdfuse file -> loop device -> (optional) mounted ext4.

    Every layer registers its own undo on an ExitStack as soon as it exists, so
    close() (also called on test failure) unwinds exactly what was set up, even
    when the daemon behind it is dead.
    """

    def __init__(self, workdir, uri, name):
        self.fuse_dir = os.path.join(workdir, f"{name}-fuse")
        self.mnt = os.path.join(workdir, f"{name}-mnt")
        self.uri = uri
        self.loop = None
        self.nbdfuse = None
        self.nbdfuse_log = os.path.join(workdir, f"{name}-nbdfuse.log")
        self._undo = contextlib.ExitStack()
        os.makedirs(self.fuse_dir, exist_ok=True)
        os.makedirs(self.mnt, exist_ok=True)

    @property
    def file(self):
        return os.path.join(self.fuse_dir, "disk")

    def attach(self):
        with open(self.nbdfuse_log, "ab") as log:
            self.nbdfuse = subprocess.Popen(["nbdfuse", self.file, self.uri], stdout=log,
                                            stderr=log, stdin=subprocess.DEVNULL)
        self._undo.callback(self._stop_nbdfuse)
        deadline = time.time() + 20
        while not (mounted(self.fuse_dir) and os.path.exists(self.file)):
            if self.nbdfuse.poll() is not None:
                raise AssertionError(f"nbdfuse exited {self.nbdfuse.returncode}: {self._log()}")
            if time.time() > deadline:
                raise AssertionError("nbdfuse did not come up: " + self._log())
            time.sleep(0.05)
        assert os.path.getsize(self.file) == DISK_SIZE
        self.loop = run("losetup", "--find", "--show", self.file).stdout.strip()
        assert self.loop.startswith("/dev/loop"), self.loop
        self._undo.callback(self._detach_loop)
        return self.loop

    def mount(self):
        run("mount", "-t", "ext4", self.loop, self.mnt)
        self._undo.callback(self._umount)

    def close(self):
        self._undo.close()

    def _log(self):
        try:
            with open(self.nbdfuse_log, errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    # Undo steps. Each tries the clean way first, then the forceful one, so a
    # dead daemon or a crashed nbdfuse never leaves a mount behind.
    def _umount(self):
        if mounted(self.mnt):
            if run("umount", self.mnt, check=False).returncode != 0:
                run("umount", "-l", self.mnt, check=False)

    def _detach_loop(self):
        loop, self.loop = self.loop, None
        if loop and run("losetup", "-d", loop, check=False).returncode != 0:
            time.sleep(0.5)
            run("losetup", "-d", loop, check=False)

    def _stop_nbdfuse(self):
        # nbdfuse may have died with the daemon (libnbd 1.14 aborts on some
        # dropped connections), leaving a dead FUSE mount: unmount that too.
        if mounted(self.fuse_dir):
            if run("fusermount3", "-u", self.fuse_dir, check=False).returncode != 0:
                run("fusermount3", "-u", "-z", self.fuse_dir, check=False)
        p, self.nbdfuse = self.nbdfuse, None
        if p is not None:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def stacks(tmp_path):
    """Makes BlockStacks and always tears down every one of them."""
    made = []

    def make(uri, name):
        s = BlockStack(str(tmp_path), uri, name)
        made.append(s)
        return s

    yield make
    for s in reversed(made):
        s.close()


def write_files(root, seed):
    """Writes a mix of files (empty, tiny, odd sizes, large, a directory tree);
    returns {relative path: sha256}."""
    rng = random.Random(seed)
    sizes = {"empty": 0, "one-byte": 1, "odd": 4095, "page": 4096, "unaligned": 123457,
             "big": 8 * MiB + 17}
    sums = {}
    for name, size in sizes.items():
        data = rng.randbytes(size)
        path = os.path.join(root, f"{seed}-{name}")
        with open(path, "wb") as f:
            f.write(data)
        sums[os.path.relpath(path, root)] = hashlib.sha256(data).hexdigest()
    tree = os.path.join(root, f"{seed}-tree")
    for i in range(60):
        d = os.path.join(tree, f"d{i % 6}")
        os.makedirs(d, exist_ok=True)
        data = rng.randbytes(rng.randrange(0, 20000))
        path = os.path.join(d, f"f{i}")
        with open(path, "wb") as f:
            f.write(data)
        sums[os.path.relpath(path, root)] = hashlib.sha256(data).hexdigest()
    return sums


def check_files(root, sums):
    bad = []
    for rel, want in sums.items():
        path = os.path.join(root, rel)
        try:
            with open(path, "rb") as f:
                got = hashlib.sha256(f.read()).hexdigest()
        except OSError as e:
            bad.append(f"{rel}: {e}")
            continue
        if got != want:
            bad.append(f"{rel}: sha256 {got} != {want}")
    assert not bad, "files changed:\n" + "\n".join(bad[:20])


def fsck_clean(loop):
    r = run("e2fsck", "-f", "-n", loop, check=False)
    assert r.returncode == 0, f"e2fsck -fn found problems ({r.returncode}):\n{r.stdout}\n{r.stderr}"


def test_ext4_survives_unmount_and_daemon_restart(daemon, stacks):
    daemon.create_disk("fsdisk", DISK_SIZE)
    uri = daemon.nbd_uri("fsdisk")

    s = stacks(uri, "first")
    loop = s.attach()
    # Full inode tables and journal now (no lazy init racing the unmount).
    run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop,
        timeout=300)
    s.mount()
    sums = write_files(s.mnt, seed=1)
    check_files(s.mnt, sums)
    s.close()

    daemon.restart()

    s = stacks(uri, "second")
    loop = s.attach()
    fsck_clean(loop)
    s.mount()
    check_files(s.mnt, sums)
    # The filesystem is still writable and a second round survives as well.
    sums.update(write_files(s.mnt, seed=2))
    os.unlink(os.path.join(s.mnt, "1-big"))
    del sums["1-big"]
    s.close()

    daemon.restart()

    s = stacks(uri, "third")
    loop = s.attach()
    fsck_clean(loop)
    s.mount()
    check_files(s.mnt, sums)
    assert not os.path.exists(os.path.join(s.mnt, "1-big"))
    s.close()


def test_ext4_synced_data_survives_kill9_while_mounted(daemon, stacks):
    """sync makes ext4 commit its journal and flush the loop device; the flush
    travels loop -> FUSE fsync -> nbdfuse -> NBD FLUSH. After that the daemon is
    killed with the filesystem still mounted: the next mount replays the journal
    and every synced file must be there."""
    daemon.create_disk("crashfs", DISK_SIZE)
    uri = daemon.nbd_uri("crashfs")

    s = stacks(uri, "before")
    loop = s.attach()
    run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop,
        timeout=300)
    s.mount()
    synced = write_files(s.mnt, seed=3)
    run("sync", "-f", s.mnt)
    # Unsynced work after the sync point: may or may not survive, must not corrupt.
    with open(os.path.join(s.mnt, "unsynced"), "wb") as f:
        f.write(os.urandom(2 * MiB))
    daemon.kill9()
    s.close()  # unmount over a dead daemon: I/O errors are expected here

    daemon.start()

    s = stacks(uri, "after")
    s.attach()
    s.mount()  # replays the journal
    check_files(s.mnt, synced)
    s.close()
    s = stacks(uri, "fsck")
    loop = s.attach()
    fsck_clean(loop)
    s.close()


@pytest.fixture(autouse=True, scope="module")
def _no_leftover_mounts():
    """Fails loudly (instead of confusing the next test) if a mount leaked."""
    yield
    with open("/proc/self/mountinfo") as f:
        leaked = [line for line in f if "pytest" in line and ("-mnt " in line or "-fuse " in line)]
    assert not leaked, "mounts left behind:\n" + "".join(leaked)
