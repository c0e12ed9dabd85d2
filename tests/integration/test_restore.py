"""What goes into a restore point and what comes back out of one.

Excluded disks are absent; shared and ephemeral disks are refused unless
excluded; a whole VM restores to the same configuration and bytes; a disk is
created from a disk restore point; the same with the whole state (disks,
staging, region) on tmpfs; a disk grown or added between points;
FileSystemConsistent points run the configured freeze/thaw hooks around the cut
(a failing freeze fails the point, thaw still runs); a restored ext4 disk
mounts (nbdfuse + loop).
"""
import os
import random
import shutil
import stat
import subprocess
import tempfile

import pytest

from blockstack import (check_files, fsck_clean, leaked_mounts, require_kernel_stack, run,
                        stack_factory, write_files)
from conftest import require
from rpointd_harness import Daemon, images_equal, nbd_save, nbd_write, operation_path

nbd = pytest.importorskip("nbd", reason="python3-libnbd (Debian python) is needed")

MiB = 1 << 20
G = 64 << 10


@pytest.fixture(autouse=True)
def _tools():
    require("nbdcopy", "qemu-img", "nbdinfo")


def fill(d, disk, rng, chunks, size):
    """Random 64 KiB chunks at random slots; returns the slots written."""
    slots = rng.sample(range(size // G), chunks)
    nbd_write(d.nbd_uri(disk), [(s * G, rng.randbytes(G)) for s in slots])
    return slots


def first_point(d, tmp_path, size, seed, chunks, point):
    """Disk `a` of `size` alone in VM `vm` with collection `c`, `chunks` random
    chunks written (fill, seeded), saved to a1.img and cut as `point`: returns
    the generator (to go on with) and the image file."""
    d.create_disk("a", size)
    d.create_vm("vm", ["a"])
    d.create_collection("c", "vm")
    rng = random.Random(seed)
    fill(d, "a", rng, chunks, size)
    img = nbd_save(d.nbd_uri("a"), tmp_path / "a1.img")
    d.create_restore_point("c", point)
    return rng, img


def exported(d, name):
    r = subprocess.run(["nbdinfo", "--list", "--json", f"nbd+unix://?socket={d.nbd_sock}"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    import json
    return name in {e["export-name"] for e in json.loads(r.stdout)["exports"]}


def assert_same(a, b, what):
    same, msg = images_equal(a, b)
    assert same, f"{what}: {msg}"


def test_excluded_disks_are_absent(daemon, tmp_path):
    d = daemon
    for disk in ("a", "b", "c"):
        d.create_disk(disk, 8 * MiB)
    d.create_disk("other", 8 * MiB)
    d.create_vm("vm", ["a", "b", "c"])
    d.create_collection("col", "vm")
    rng = random.Random(1)
    for disk in ("a", "b", "c"):
        fill(d, disk, rng, 8, 8 * MiB)

    r = d.start_restore_point("col", "bad", exclude=["other"])
    assert r.status == 400 and "other" in r.json["error"]["message"], r
    assert d.api("GET", "/restorePointCollections/col/restorePoints/bad").status == 404

    rp = d.create_restore_point("col", "rp", exclude=["b"])
    p = rp["properties"]
    assert p["excludeDisks"] == [{"id": "/disks/b"}], p
    assert [x["name"] for x in p["sourceMetadata"]["storageProfile"]["disks"]] == ["a", "c"]
    drps = d.api("GET", "/restorePointCollections/col/restorePoints/rp/diskRestorePoints")
    assert drps.status == 200, drps
    assert sorted(x["name"] for x in drps.json["value"]) == ["a", "c"]
    assert d.api("GET", "/restorePointCollections/col/restorePoints/rp/diskRestorePoints/b"
                 ).status == 404
    assert exported(d, "col/rp/a") and exported(d, "col/rp/c")
    assert not exported(d, "col/rp/b")
    assert os.system(f"nbdinfo --can connect '{d.rp_uri('col', 'rp', 'b')}' 2>/dev/null") != 0
    assert_same(nbd_save(d.nbd_uri("c"), tmp_path / "c"),
                nbd_save(d.rp_uri("col", "rp", "c"), tmp_path / "c.rp"), "disk c")


def test_shared_and_ephemeral_refused_unless_excluded(daemon):
    d = daemon
    d.create_disk("os", 8 * MiB)
    d.create_disk("quorum", 8 * MiB, kind="shared")
    d.create_disk("scratch", 8 * MiB, kind="ephemeral")
    d.create_vm("vm", ["os", "quorum", "scratch"])
    d.create_collection("c", "vm")

    r = d.start_restore_point("c", "rp")
    assert r.status == 400, r
    msg = r.json["error"]["message"]
    assert "quorum" in msg or "scratch" in msg, msg
    r = d.start_restore_point("c", "rp", exclude=["scratch"])
    assert r.status == 400 and "quorum" in r.json["error"]["message"], r
    assert "shared" in r.json["error"]["message"], r
    r = d.start_restore_point("c", "rp", exclude=["quorum"])
    assert r.status == 400 and "scratch" in r.json["error"]["message"], r
    assert "ephemeral" in r.json["error"]["message"], r
    assert d.api("GET", "/restorePointCollections/c/restorePoints/rp").status == 404

    rp = d.create_restore_point("c", "rp", exclude=["quorum", "scratch"])
    assert [x["name"] for x in rp["properties"]["sourceMetadata"]["storageProfile"]["disks"]] \
        == ["os"]


def test_restore_vm_same_configuration_and_bytes(daemon, tmp_path):
    d = daemon
    config = {"hardwareProfile": {"vmSize": "Standard_D2s_v5"}, "cpus": 2,
              "nics": [{"mac": "52:54:00:12:34:56"}], "note": "ünïcode ok"}
    d.create_disk("a", 32 * MiB)
    d.create_disk("b", 16 * MiB)
    d.create_vm("src", ["a", "b"], configuration=config)
    d.create_collection("c", "src")
    rng = random.Random(2)
    fill(d, "a", rng, 40, 32 * MiB)
    fill(d, "b", rng, 20, 16 * MiB)
    imgs = {x: nbd_save(d.nbd_uri(x), tmp_path / f"{x}.img") for x in ("a", "b")}
    d.create_restore_point("c", "rp")
    fill(d, "a", rng, 10, 32 * MiB)  # the source moves on

    r, _ = d.restore_vm("c", "rp", "new")
    vm = d.api("GET", "/vms/new")
    assert vm.status == 200, vm
    assert vm.json["properties"]["configuration"] == config
    assert [x["id"] for x in vm.json["properties"]["disks"]] == ["/disks/new-a", "/disks/new-b"]
    for x in ("a", "b"):
        disk = d.api("GET", f"/disks/new-{x}").json["properties"]
        assert disk["provisioningState"] == "Succeeded", disk
        assert disk["kind"] == "managed"
        assert_same(imgs[x], nbd_save(d.nbd_uri(f"new-{x}"), tmp_path / f"new-{x}"),
                    f"restored disk new-{x}")

    d.restore_vm("c", "rp", "new2", disk_names={"a": "renamed"})
    vm2 = d.api("GET", "/vms/new2").json
    assert [x["id"] for x in vm2["properties"]["disks"]] == ["/disks/renamed", "/disks/new2-b"]
    assert_same(imgs["a"], nbd_save(d.nbd_uri("renamed"), tmp_path / "renamed"), "renamed")

    # Existing VM or disk names are refused up front.
    r = d.api("POST", "/restorePointCollections/c/restorePoints/rp/restore", {"vmName": "new"})
    assert r.status == 409, r
    r = d.api("POST", "/restorePointCollections/c/restorePoints/rp/restore",
              {"vmName": "new3", "diskNames": {"a": "a"}})
    assert r.status == 409, r
    assert d.api("GET", "/vms/new3").status == 404

    # A restored disk is an ordinary writable disk, independent of the point.
    nbd_write(d.nbd_uri("new-a"), [(0, b"\xff" * G)])
    assert_same(imgs["a"], nbd_save(d.rp_uri("c", "rp", "a"), tmp_path / "rp.a"), "point a")


def test_vm_and_collection_lifecycle(daemon, tmp_path):
    """A disk in a VM cannot be deleted; deleting the VM keeps its points;
    deleting the collection deletes its points and their exports."""
    d = daemon
    d.create_disk("a", 8 * MiB)
    d.create_vm("vm", ["a"], configuration={"x": 1})
    d.create_collection("c", "vm")
    fill(d, "a", random.Random(6), 8, 8 * MiB)
    img = nbd_save(d.nbd_uri("a"), tmp_path / "a.img")
    d.create_restore_point("c", "rp")

    r = d.api("DELETE", "/disks/a")
    assert r.status == 409 and "vm" in r.json["error"]["message"], r
    assert d.api("DELETE", "/vms/vm").status == 204
    assert d.api("GET", "/vms/vm").status == 404
    assert d.api("DELETE", "/disks/a").status == 204
    # The point outlives its VM and its disk.
    assert d.get_restore_point("c", "rp")["properties"]["provisioningState"] == "Succeeded"
    assert_same(img, nbd_save(d.rp_uri("c", "rp", "a"), tmp_path / "rp.a"), "point a")
    d.restart()
    assert_same(img, nbd_save(d.rp_uri("c", "rp", "a"), tmp_path / "rp.b"), "after restart")
    expanded = d.api("GET", "/restorePointCollections/c?$expand=restorePoints").json
    assert [x["name"] for x in expanded["properties"]["restorePoints"]] == ["rp"]

    assert d.api("DELETE", "/restorePointCollections/c").status == 204
    assert d.api("GET", "/restorePointCollections/c").status == 404
    assert not exported(d, "c/rp/a")


def test_disk_create_from_point(daemon, tmp_path):
    d = daemon
    d.create_disk("a", 64 * MiB)
    d.create_vm("vm", ["a"])
    d.create_collection("c", "vm")
    rng = random.Random(3)
    slots = fill(d, "a", rng, 64, 64 * MiB)
    img = nbd_save(d.nbd_uri("a"), tmp_path / "a.img")
    d.create_restore_point("c", "rp")
    src = "/restorePointCollections/c/restorePoints/rp/diskRestorePoints/a"

    r = d.api("PUT", "/disks/r1", {"properties": {"creationData": {"createOption": "Restore",
                                                                   "sourceResourceId": src}}})
    assert r.status == 201, r
    op = operation_path(r)
    p = r.json["properties"]
    assert p["provisioningState"] == "Creating", p
    assert p["creationData"] == {"createOption": "Restore", "sourceResourceId": src}, p
    # Not served before the copy is complete: if the operation is still running
    # after the export list was read, the list must not have had the disk.
    listed = exported(d, "r1")
    if d.api("GET", op).json["status"] == "InProgress":
        assert not listed, "a disk being restored is already exported"
    done = d.wait_operation(op)
    assert done["status"] == "Succeeded", done
    assert done["properties"]["kind"] == "RestoreDisk", done
    disk = d.api("GET", "/disks/r1").json["properties"]
    assert disk["provisioningState"] == "Succeeded" and disk["sizeBytes"] == 64 * MiB, disk
    assert_same(img, nbd_save(d.nbd_uri("r1"), tmp_path / "r1.img"), "disk r1")
    # Sparse: holes stay holes in the new file.
    st = os.stat(disk["path"])
    assert stat.S_ISREG(st.st_mode)
    assert st.st_blocks * 512 <= len(slots) * G + 4 * MiB, st.st_blocks * 512

    # Without createOption, too.
    r = d.api("PUT", "/disks/r2", {"properties": {"creationData": {"sourceResourceId": src}}})
    assert r.status == 201, r
    assert d.wait_operation(operation_path(r))["status"] == "Succeeded"

    r = d.api("PUT", "/disks/r3", {"properties": {"creationData": {
        "sourceResourceId": "/restorePointCollections/c/restorePoints/nope/diskRestorePoints/a"}}})
    assert r.status == 404, r
    r = d.api("PUT", "/disks/r4", {"properties": {"sizeBytes": MiB, "creationData": {
        "sourceResourceId": src}}})
    assert r.status == 400, r
    assert d.api("GET", "/disks/r3").status == 404
    assert d.api("GET", "/disks/r4").status == 404


def test_points_and_restores_on_tmpfs(tmp_path):
    """Disks, staging and region on tmpfs, where O_DIRECT is the page cache (or
    refused, on kernels before 6.6): the copier's direct reads, the packs' and
    the restore's direct writes still give exact points and restores."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    state = tempfile.mkdtemp(prefix="rpointd-tmpfs-", dir="/dev/shm")
    d = Daemon(os.path.join(state, "state")).start()
    try:
        rng, img1 = first_point(d, tmp_path, 64 * MiB, 11, 200, "full")
        fill(d, "a", rng, 50, 64 * MiB)
        img2 = nbd_save(d.nbd_uri("a"), tmp_path / "a2.img")
        d.create_restore_point("c", "inc")
        for name, img in (("full", img1), ("inc", img2)):
            src = f"/restorePointCollections/c/restorePoints/{name}/diskRestorePoints/a"
            r = d.api("PUT", f"/disks/r-{name}", {"properties": {"creationData": {
                "createOption": "Restore", "sourceResourceId": src}}})
            assert r.status == 201, r
            assert d.wait_operation(operation_path(r))["status"] == "Succeeded"
            assert_same(img, nbd_save(d.nbd_uri(f"r-{name}"), tmp_path / f"r-{name}.img"),
                        f"disk restored from {name}")
        rc = d.stop()
        assert rc == 0, "rpointd did not exit 0 on SIGTERM:\n" + d.log()
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.kill9()
        shutil.rmtree(state, ignore_errors=True)


def test_grown_and_added_disk_between_points(daemon, tmp_path):
    d = daemon
    rng, img1 = first_point(d, tmp_path, 32 * MiB, 4, 32, "rp1")

    r = d.api("PATCH", "/disks/a", {"properties": {"sizeBytes": 48 * MiB}})
    assert r.status == 200, r
    nbd_write(d.nbd_uri("a"), [(MiB, rng.randbytes(G)), (40 * MiB, rng.randbytes(2 * G)),
                               (48 * MiB - G, rng.randbytes(G))])
    d.create_disk("b", 16 * MiB)
    fill(d, "b", rng, 16, 16 * MiB)
    d.create_vm("vm", ["a", "b"])
    img2 = {x: nbd_save(d.nbd_uri(x), tmp_path / f"{x}2.img") for x in ("a", "b")}
    rp2 = d.create_restore_point("c", "rp2")
    sizes = {x["name"]: x["sizeBytes"]
             for x in rp2["properties"]["sourceMetadata"]["storageProfile"]["disks"]}
    assert sizes == {"a": 48 * MiB, "b": 16 * MiB}, sizes

    a2 = d.disk_restore_point("c", "rp2", "a")["properties"]
    b2 = d.disk_restore_point("c", "rp2", "b")["properties"]
    assert a2["incremental"] is True and a2["sizeBytes"] == 48 * MiB, a2
    assert a2["blocksChanged"] <= 8, a2   # the 4 written chunks (+ slack), not the growth
    assert b2["incremental"] is False, b2
    assert d.disk_restore_point("c", "rp1", "a")["properties"]["sizeBytes"] == 32 * MiB
    assert_same(img1, nbd_save(d.rp_uri("c", "rp1", "a"), tmp_path / "rp1a"), "rp1/a")
    for x in ("a", "b"):
        assert_same(img2[x], nbd_save(d.rp_uri("c", "rp2", x), tmp_path / f"rp2{x}"),
                    f"rp2/{x}")
    # And the next point after all that is incremental for both.
    nbd_write(d.nbd_uri("b"), [(0, rng.randbytes(G))])
    d.create_restore_point("c", "rp3")
    assert d.disk_restore_point("c", "rp3", "b")["properties"]["incremental"] is True
    assert_same(nbd_save(d.nbd_uri("b"), tmp_path / "b3"),
                nbd_save(d.rp_uri("c", "rp3", "b"), tmp_path / "rp3b"), "rp3/b")


HOOK = """#!/bin/sh
echo "$RPOINT_PHASE $RPOINT_VM $RPOINT_COLLECTION $RPOINT_RESTORE_POINT" >> {log}
/usr/bin/python3 -c 'import nbd, os
h = nbd.NBD()
h.connect_uri("nbd+unix:///" + os.environ["RPOINT_VM"] + "-d?socket={sock}")
h.pwrite(b"{marker}" * 512, {offset})
h.shutdown()' || exit 9
{extra}
"""


def test_filesystem_consistent_hooks(make_daemon, tmp_path):
    state = tmp_path / "state"
    sock = state / "nbd.sock"
    log = tmp_path / "hooks.log"

    def script(name, marker, offset, extra=""):
        p = tmp_path / name
        p.write_text(HOOK.format(log=log, sock=sock, marker=marker, offset=offset, extra=extra))
        p.chmod(0o755)
        return str(p)

    freeze = script("freeze.sh", "FREEZE..", 0)
    thaw = script("thaw.sh", "THAWED..", 8192)
    bad = script("badfreeze.sh", "BADFRZ..", 0, 'echo "cannot freeze the guest" >&2; exit 7')
    config = f"""consistency:
  hook_timeout_seconds: 20
  vms:
    good: {{freeze: "{freeze}", thaw: "{thaw}"}}
    bad: {{freeze: "{bad}", thaw: "{thaw}"}}
"""
    d = make_daemon(config_text=config).start()
    for vm in ("good", "bad", "plain"):
        d.create_disk(f"{vm}-d", 8 * MiB)
        d.create_vm(vm, [f"{vm}-d"])
        d.create_collection(f"c-{vm}", vm)

    rp = d.create_restore_point("c-good", "fs1", consistency="FileSystemConsistent")
    assert rp["properties"]["consistencyMode"] == "FileSystemConsistent"
    assert log.read_text().splitlines() == ["freeze good c-good fs1", "thaw good c-good fs1"]
    # The freeze ran before the cut (its write is in the point), the thaw after it.
    h = nbd.NBD()
    h.connect_uri(d.rp_uri("c-good", "fs1", "good-d"))
    assert h.pread(4096, 0) == b"FREEZE.." * 512
    assert h.pread(4096, 8192) == bytes(4096)
    h.shutdown()
    h = nbd.NBD()
    h.connect_uri(d.nbd_uri("good-d"))
    assert h.pread(4096, 8192) == b"THAWED.." * 512
    h.shutdown()

    log.write_text("")
    r = d.start_restore_point("c-bad", "fs1", consistency="FileSystemConsistent")
    assert r.status == 201, r
    op = d.wait_operation(operation_path(r))
    assert op["status"] == "Failed", op
    p = d.get_restore_point("c-bad", "fs1")["properties"]
    assert p["provisioningState"] == "Failed", p
    err = p["error"]
    assert err["code"] == "FreezeFailed", err
    assert "badfreeze.sh" in err["message"] and "7" in err["message"], err
    assert "cannot freeze the guest" in err["message"], err
    assert op["error"]["code"] == "FreezeFailed", op
    assert log.read_text().splitlines() == ["freeze bad c-bad fs1", "thaw bad c-bad fs1"]
    # A failed point does not block the next one.
    d.create_restore_point("c-bad", "crash1")

    r = d.start_restore_point("c-plain", "fs1", consistency="FileSystemConsistent")
    assert r.status == 400 and "plain" in r.json["error"]["message"], r
    d.create_restore_point("c-plain", "crash1", consistency="CrashConsistent")


@pytest.fixture
def stacks(tmp_path):
    require_kernel_stack()
    with stack_factory(tmp_path) as make:
        yield make
    leaked = leaked_mounts()
    assert not leaked, "mounts left behind:\n" + "".join(leaked)


def test_restored_disk_mounts(daemon, stacks):
    d = daemon
    size = 128 * MiB
    d.create_disk("fs", size)
    d.create_vm("vm", ["fs"])
    d.create_collection("c", "vm")
    s = stacks(d.nbd_uri("fs"), "src", size=size)
    loop = s.attach()
    run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop,
        timeout=300)
    s.mount()
    sums = write_files(s.mnt, seed=7)
    s.close()  # clean unmount: the point sees a clean filesystem
    d.create_restore_point("c", "rp")

    # The source moves on.
    s = stacks(d.nbd_uri("fs"), "src2", size=size)
    s.attach()
    s.mount()
    later = write_files(s.mnt, seed=8)
    os.unlink(os.path.join(s.mnt, "7-big"))
    s.close()

    d.restore_disk("fs-restored", "c", "rp", "fs")
    s = stacks(d.nbd_uri("fs-restored"), "restored", size=size)
    loop = s.attach()
    fsck_clean(loop)
    s.mount()
    check_files(s.mnt, sums)
    assert not any(os.path.exists(os.path.join(s.mnt, rel)) for rel in later)
    s.close()
