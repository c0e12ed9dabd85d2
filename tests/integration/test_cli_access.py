"""rpoint access grant|revoke against the real daemon: the URI alone on stdout
(it works in nbdinfo and nbdcopy), -o json is the server's operation, the
same URI on a repeat, revoke's two answers, and exit codes (2 usage, 1 server
error)."""
import json
import subprocess

import pytest

from conftest import require
from rpointd_harness import RPOINT_CLI, images_equal, nbd_save, nbd_write

MiB = 1 << 20


def rpoint(d, *args):
    return subprocess.run([RPOINT_CLI, "--socket", d.control_sock] + [str(a) for a in args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def point(daemon):
    d = daemon
    d.create_disk("a", 4 * MiB)
    nbd_write(d.nbd_uri("a"), [(MiB, b"\x5a" * 65536)])
    d.create_vm("web", ["a"])
    d.create_collection("c", "web")
    d.create_restore_point("c", "rp1")
    return d


def test_grant_prints_a_working_uri_and_revoke_ends_it(point, tmp_path):
    require("nbdinfo", "nbdcopy")
    d = point
    r = rpoint(d, "access", "grant", "c/rp1/a", "--duration", "1h")
    assert r.returncode == 0, r.stderr
    uri = r.stdout.strip()
    assert uri.startswith("nbd+unix:///") and uri.endswith(f"?socket={d.nbd_sock}"), uri
    assert r.stdout == uri + "\n" and "valid until 20" in r.stderr
    assert images_equal(nbd_save(uri, tmp_path / "g.raw"),
                        nbd_save(d.rp_uri("c", "rp1", "a"), tmp_path / "p.raw"))[0]
    # Again: the same URI; -o json is the operation the server answered.
    r = rpoint(d, "-o", "json", "access", "grant", "c/rp1/a", "--duration", "90m")
    assert r.returncode == 0, r.stderr
    op = json.loads(r.stdout)
    assert op["status"] == "Succeeded" and op["properties"]["kind"] == "BeginGetAccess"
    assert op["properties"]["output"]["accessSAS"] == uri
    assert d.api("GET", op["id"]).json == op
    r = rpoint(d, "access", "revoke", "c/rp1/a")
    assert r.returncode == 0 and r.stdout == "revoked\n", r
    r = subprocess.run(["nbdinfo", uri], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0, r.stderr
    r = rpoint(d, "access", "revoke", "c/rp1/a")
    assert r.returncode == 0 and r.stdout == "no active grant\n", r


def test_errors(point):
    d = point
    for args in [["access", "grant", "c/rp1/a"],                         # no --duration
                 ["access", "grant", "c/rp1/a", "--duration", "1x"],
                 ["access", "grant", "c/rp1/a", "--duration", "0"],
                 ["access", "grant", "c/rp1", "--duration", "1h"],       # not C/RP/DISK
                 ["access", "revoke", "c/rp1"]]:
        r = rpoint(d, *args)
        assert r.returncode == 2, (args, r)
    r = rpoint(d, "access", "grant", "c/rp1/nope", "--duration", "1h")
    assert r.returncode == 1 and "no disk restore point 'nope'" in r.stderr, r
    r = rpoint(d, "access", "grant", "c/rp1/a", "--duration", "1h", "--listener", "tcp")
    assert r.returncode == 1 and "nbd.tcp" in r.stderr, r
    r = rpoint(d, "access", "grant", "c/rp1/a", "--duration", "400d")
    assert r.returncode == 1 and "durationInSeconds" in r.stderr, r
    r = rpoint(d, "access", "--help")
    assert "grant" in r.stdout + r.stderr
