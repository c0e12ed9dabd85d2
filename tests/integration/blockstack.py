"""An NBD export as a kernel block device with a filesystem on it.

export -> nbdfuse file -> loop device -> (optional) mounted ext4, torn down
in reverse even when the daemon behind it died. Shared by the filesystem tests
(test_filesystem.py, test_restore.py). Needs root, /dev/fuse and loop devices:
call require_kernel_stack() first (it skips otherwise).
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


class BlockStack:
    """export -> nbdfuse file -> loop device -> (optional) mounted ext4.

    Every layer registers its own undo on an ExitStack as soon as it exists, so
    close() (also called on test failure) unwinds exactly what was set up, even
    when the daemon behind it is dead.
    """

    def __init__(self, workdir, uri, name, size=None):
        self.fuse_dir = os.path.join(workdir, f"{name}-fuse")
        self.mnt = os.path.join(workdir, f"{name}-mnt")
        self.uri = uri
        self.size = size
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
        if self.size is not None:
            assert os.path.getsize(self.file) == self.size
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


@contextlib.contextmanager
def stack_factory(workdir, size=None):
    """Makes BlockStacks and always tears down every one of them (for fixtures)."""
    made = []

    def make(uri, name, size=size):
        s = BlockStack(str(workdir), uri, name, size=size)
        made.append(s)
        return s

    try:
        yield make
    finally:
        for s in reversed(made):
            s.close()


def require_kernel_stack():
    """Skips unless nbdfuse + loop + ext4 can be used here (root, /dev/fuse, loop)."""
    require("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount")
    if os.geteuid() != 0:
        pytest.skip("needs root for losetup and mount")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no loop device support")


def leaked_mounts():
    """Mount lines of BlockStacks that a test left behind (under pytest tmp dirs)."""
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if "pytest" in line and ("-mnt " in line or "-fuse " in line)]


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


