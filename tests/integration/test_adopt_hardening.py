"""Control plane hardening (issue #8): what may be adopted as a disk, the modes
of the daemon's files, a disk whose adopted file shrank while the daemon was
down, and name errors that name the right kind of resource."""

import os
import stat
import subprocess

import pytest

from rpointd_harness import Daemon

MiB = 1 << 20


def put(d, name, props):
    return d.api("PUT", f"/disks/{name}", {"properties": props})


def err(r):
    assert r.json is not None and set(r.json) == {"error"}, r
    return r.json["error"]["code"], r.json["error"]["message"]


def make_image(path, size=4 * MiB, data=b""):
    with open(path, "wb") as f:
        f.truncate(size)
        if data:
            f.seek(MiB)
            f.write(data)
    return str(path)


def with_point(d, disk="a"):
    """A disk with data, a VM, a collection and one Succeeded point: every kind
    of file the daemon makes (tracking bitmaps, packs, databases) exists."""
    import nbd
    d.create_disk(disk, 4 * MiB)
    h = nbd.NBD()
    h.connect_uri(d.nbd_uri(disk))
    h.pwrite(b"x" * 65536, 0)
    h.flush()
    h.shutdown()
    d.create_vm("vm1", [disk])
    d.create_collection("c1", "vm1")
    d.create_restore_point("c1", "p1")


def test_daemon_files_cannot_be_adopted(tmp_path):
    d = Daemon(tmp_path / "state").start()
    try:
        with_point(d)
        state = os.path.realpath(d.state_dir)
        own = []
        for root, _dirs, files in os.walk(state):
            for f in files:
                p = os.path.join(root, f)
                if stat.S_ISREG(os.lstat(p).st_mode):
                    own.append(p)
        names = {os.path.basename(p) for p in own}
        assert "metadata.db" in names, names
        assert any(p.endswith(".ctbm") for p in own), own
        assert any("/regions/" in p for p in own), own
        # Directly, through a symlink from outside, and through a hard link
        # made outside (same filesystem: the pytest tmp dir holds the state).
        tricks = []
        for i, p in enumerate(own):
            link = tmp_path / f"sym{i}.raw"
            os.symlink(p, link)
            tricks.append(str(link))
        hard = tmp_path / "hard.raw"
        ctbm = next(p for p in own if p.endswith(".ctbm"))
        os.link(ctbm, hard)
        for path in own + tricks + [str(hard)]:
            r = put(d, "evil", {"path": path})
            assert r.status == 400, (path, r)
            code, msg = err(r)
            assert code == "InvalidArgument", (path, r)
            assert "rpointd's own files" in msg or "hard links" in msg, (path, msg)
        # The state directory itself and its parent's other files are fine to
        # name, a plain file next to it is adopted.
        ok = make_image(tmp_path / "fine.raw")
        assert put(d, "fine", {"path": ok}).status == 201
        assert d.api("GET", "/disks/evil").status == 404
    finally:
        assert d.stop() == 0, d.log()


def test_adopt_paths_allow_list(tmp_path):
    allowed = tmp_path / "images"
    other = tmp_path / "elsewhere"
    allowed.mkdir()
    other.mkdir()
    good = make_image(allowed / "good.raw")
    bad = make_image(other / "bad.raw")
    os.symlink(bad, allowed / "sneaky.raw")
    d = Daemon(tmp_path / "state", config_text=f"adopt_paths: ['{allowed}']\n").start()
    try:
        for path in (bad, str(allowed / "sneaky.raw"), "/etc/passwd"):
            r = put(d, "x", {"path": path})
            assert r.status == 403, (path, r)
            code, msg = err(r)
            assert code == "PermissionDenied" and "adopt_paths" in msg, (path, r)
        assert put(d, "good", {"path": good}).status == 201
    finally:
        assert d.stop() == 0, d.log()
    # [] refuses every adoption.
    d = Daemon(tmp_path / "state2", config_text="adopt_paths: []\n").start()
    try:
        assert put(d, "x", {"path": good}).status == 403
    finally:
        assert d.stop() == 0, d.log()


def test_modes_private_whatever_the_umask(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)  # an existing, world-readable state directory
    old = os.umask(0)
    try:
        d = Daemon(state).start()
    finally:
        os.umask(old)
    try:
        with_point(d)
        d.api("PUT", "/disks/b", {"properties": {"sizeBytes": MiB}})
    finally:
        assert d.stop() == 0, d.log()
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert "readable by others" in d.log()
    bad = []
    # The harness makes rpointd.log and rpointd.yaml; sockets have their
    # configured modes.
    harness = {os.path.join(str(state), n) for n in ("rpointd.log", "rpointd.yaml")}
    checked = 0
    for root, dirs, files in os.walk(state):
        for n in dirs + files:
            p = os.path.join(root, n)
            if p in harness:
                continue
            st = os.lstat(p)
            if stat.S_ISSOCK(st.st_mode) or stat.S_ISLNK(st.st_mode):
                continue
            checked += 1
            want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
            if stat.S_IMODE(st.st_mode) & 0o077:
                bad.append((p, oct(stat.S_IMODE(st.st_mode)), oct(want)))
    assert checked > 10
    assert not bad, bad


def test_adopted_file_shrunk_while_down(tmp_path):
    import nbd
    img = make_image(tmp_path / "img.raw", data=b"adopted!")
    d = Daemon(tmp_path / "state").start()
    assert put(d, "ad", {"path": img}).status == 201
    d.create_disk("other", MiB)
    assert d.stop() == 0
    os.truncate(img, 2 * MiB)
    d.start()
    try:
        r = d.api("GET", "/disks/ad")
        assert r.status == 200, r
        p = r.json["properties"]
        assert p["diskState"] == "Unavailable", p
        assert p["sizeBytes"] == 4 * MiB, p
        assert "smaller" in p["error"]["message"], p
        assert "export" not in p, p
        h = nbd.NBD()
        with pytest.raises(nbd.Error):
            h.connect_uri(d.nbd_uri("ad"))
        h = nbd.NBD()
        h.connect_uri(d.nbd_uri("other"))
        assert h.get_size() == MiB
        h.shutdown()
    finally:
        assert d.stop() == 0, d.log()
    os.truncate(img, 4 * MiB)
    d.start()
    try:
        p = d.api("GET", "/disks/ad").json["properties"]
        assert p["diskState"] == "Unattached" and "error" not in p, p
        h = nbd.NBD()
        h.connect_uri(d.nbd_uri("ad"))
        assert h.get_size() == 4 * MiB
        assert h.pread(8, MiB) == b"adopted!"
        h.shutdown()
    finally:
        assert d.stop() == 0, d.log()


@pytest.mark.parametrize("method,path,body,kind", [
    ("PUT", "/vms/-bad", {"properties": {"disks": []}}, "VM name"),
    ("GET", "/vms/-bad", None, "VM name"),
    ("DELETE", "/vms/-bad", None, "VM name"),
    ("PUT", "/restorePointCollections/-bad", {"properties": {"source": {"id": "/vms/v"}}},
     "collection name"),
    ("GET", "/restorePointCollections/-bad", None, "collection name"),
    ("PUT", "/restorePointCollections/c/restorePoints/-bad", {"properties": {}},
     "restore point name"),
    ("GET", "/restorePointCollections/c/restorePoints/-bad", None, "restore point name"),
    ("PUT", "/disks/-bad", {"properties": {"sizeBytes": MiB}}, "disk name"),
])
def test_name_errors_name_the_resource(daemon, method, path, body, kind):
    r = daemon.api(method, path, body)
    assert r.status == 400, r
    code, msg = err(r)
    assert code == "InvalidArgument"
    assert msg.startswith(kind), msg
