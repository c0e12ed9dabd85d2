"""A real ext4 filesystem on an rpointd disk, through the kernel.

The export is mounted with nbdfuse (the kernel here has no nbd module), the FUSE
file attached to a loop device, formatted and mounted. Files with known
checksums must come back intact after unmount + daemon restart, and, for what
was synced, after a kill -9 of the daemon under a mounted filesystem (journal
replay on the next mount).

Needs root (losetup, mount) and /dev/fuse; skips otherwise.
"""
import os

import pytest

from blockstack import (check_files, fsck_clean, leaked_mounts, require_kernel_stack, run,
                        stack_factory, write_files)

MiB = 1 << 20
DISK_SIZE = 256 * MiB


@pytest.fixture(autouse=True)
def _needs_kernel_stack():
    require_kernel_stack()


@pytest.fixture
def stacks(tmp_path):
    with stack_factory(tmp_path, size=DISK_SIZE) as make:
        yield make


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
    leaked = leaked_mounts()
    assert not leaked, "mounts left behind:\n" + "".join(leaked)
