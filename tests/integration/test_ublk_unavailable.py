"""ublk on a host without the driver (this machine's kernel has no ublk_drv):
a disk asked for with export "ublk" is refused with a clear 503 that names
the module, the CLI exits non-zero with that message, nothing is left
behind, NBD disks go on as before; a ublk disk already recorded in
metadata.db comes up Unavailable with the reason, the daemon and its NBD
disks unaffected. The ublk data path itself runs in the VM lane
(tests/vm/test_ublk.py)."""
import os
import sqlite3

import pytest

pytestmark = pytest.mark.skipif(os.path.exists("/dev/ublk-control"),
                                reason="this host has ublk: the lane tests cover it")


def assert_ublk_unavailable(r):
    assert r.status == 503, r
    err = r.json["error"]
    assert err["code"] == "UblkUnavailable", r
    assert "ublk_drv" in err["message"] and "modprobe ublk_drv" in err["message"], r
    assert "/dev/ublk-control" in err["message"], r


def test_create_refused_with_reason(daemon):
    r = daemon.api("PUT", "/disks/u", {"properties": {"sizeBytes": 1 << 20, "export": "ublk"}})
    assert_ublk_unavailable(r)
    assert daemon.api("GET", "/disks/u").status == 404
    assert not os.path.exists(os.path.join(daemon.state_dir, "disks", "u.raw"))

    # A bad export value is the client's mistake, not the host's.
    r = daemon.api("PUT", "/disks/x", {"properties": {"sizeBytes": 1 << 20, "export": "iscsi"}})
    assert r.status == 400 and "export" in r.json["error"]["message"], r

    # The CLI says the same and exits non-zero.
    c = daemon.cli("disk", "create", "u", "--size", "1M", "--export", "ublk", check=False)
    assert c.returncode != 0
    assert "ublk_drv" in (c.stdout + c.stderr), c
    assert daemon.api("GET", "/disks/u").status == 404

    # NBD disks are unaffected, and say how they are served.
    d = daemon.create_disk("n", 1 << 20)
    assert d["properties"]["export"] == {"nbd": {"name": "n"}}
    c = daemon.cli("disk", "create", "n2", "--size", "1M", "--export", "nbd")
    assert daemon.api("GET", "/disks/n2").json["properties"]["export"]["nbd"]["name"] == "n2"


def test_recorded_ublk_disk_unavailable_after_restart(daemon):
    import nbd
    daemon.create_disk("u", 1 << 20)
    daemon.create_disk("n", 1 << 20)
    assert daemon.stop() == 0
    # A disk recorded as served over ublk (a database from a host with the
    # driver, or a module unloaded since).
    db = sqlite3.connect(os.path.join(daemon.state_dir, "metadata.db"))
    db.execute("UPDATE disks SET export_mode = 'ublk', ublk_dev_id = 3 WHERE name = 'u'")
    db.commit()
    db.close()
    daemon.start()
    u = daemon.api("GET", "/disks/u").json["properties"]
    assert u["diskState"] == "Unavailable", u
    assert u["error"]["code"] == "UblkUnavailable", u
    assert "ublk_drv" in u["error"]["message"], u
    assert u["export"]["ublk"]["state"] == "Unavailable", u
    # The NBD disk is served as before.
    h = nbd.NBD()
    h.connect_uri(daemon.nbd_uri("n"))
    h.pwrite(b"x" * 512, 0)
    assert h.pread(512, 0) == b"x" * 512
    h.shutdown()
    # The unavailable disk can still be deleted.
    assert daemon.api("DELETE", "/disks/u").status == 204
