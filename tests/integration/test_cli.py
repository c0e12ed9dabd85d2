"""The rpoint CLI against the real daemon: tables, -o json, exit codes
(0 ok, 1 server error, 2 usage, 3 unreachable), socket selection.
"""
import json
import os
import subprocess

import pytest

from rpointd_harness import RPOINT_CLI

GiB = 1 << 30
MiB = 1 << 20


def rpoint(*args, env=None):
    e = dict(os.environ)
    e.pop("RPOINT_SOCKET", None)
    if env:
        e.update(env)
    return subprocess.run([RPOINT_CLI] + [str(a) for a in args], capture_output=True, text=True,
                          timeout=60, env=e)


def fields(text):
    """'Key:   value' lines -> dict."""
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        out[k.strip()] = v.strip()
    return out


def test_create_show_list_resize_delete(daemon):
    r = daemon.cli("disk", "create", "vm1", "--size", "10G")
    f = fields(r.stdout)
    assert f["Name"] == "vm1"
    assert f["Size"] == "10 GiB (10737418240 bytes)"
    assert f["Kind"] == "managed"
    assert f["State"] == "Unattached"
    assert f["Clients"] == "0"
    assert f["NBD export"] == "vm1"
    assert f["Origin"] == "created"
    assert os.path.getsize(f["Path"]) == 10 * GiB
    assert daemon.api("GET", "/disks/vm1").json["properties"]["sizeBytes"] == 10 * GiB

    # Same command again: idempotent, exit 0.
    daemon.cli("disk", "create", "vm1", "--size", "10G")
    daemon.cli("disk", "create", "scratch", "--size", "512M", "--kind", "ephemeral")
    daemon.cli("disk", "create", "bytes", "--size", "1048576")

    lines = daemon.cli("disk", "list").stdout.splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "KIND", "STATE", "CLIENTS", "PATH"]
    rows = [l.split() for l in lines[1:]]
    assert [r[0] for r in rows] == ["bytes", "scratch", "vm1"]
    assert rows[1][1:5] == ["512", "MiB", "ephemeral", "Unattached"]
    assert rows[2][1:3] == ["10", "GiB"]
    # Columns line up: every row's PATH starts where the header's does.
    col = lines[0].index("PATH")
    assert all(l[col:].startswith("/") for l in lines[1:])

    assert fields(daemon.cli("disk", "show", "scratch").stdout)["Kind"] == "ephemeral"
    f = fields(daemon.cli("disk", "resize", "vm1", "--size", "20GiB").stdout)
    assert f["Size"] == "20 GiB (21474836480 bytes)"

    r = daemon.cli("disk", "delete", "vm1")
    assert r.stdout == "deleted disk 'vm1'\n"
    assert daemon.api("GET", "/disks/vm1").status == 404


def test_json_output_is_the_servers(daemon):
    r = daemon.cli("-o", "json", "disk", "create", "j", "--size", "1M")
    created = json.loads(r.stdout)
    assert created == daemon.api("GET", "/disks/j").json
    assert list(created) == ["id", "name", "type", "properties"]  # server's order kept
    assert json.loads(daemon.cli("disk", "list", "-o", "json").stdout) == \
        daemon.api("GET", "/disks").json
    assert json.loads(daemon.cli("disk", "show", "j", "--output=json").stdout) == created
    grown = json.loads(daemon.cli("disk", "resize", "j", "--size", "2M", "-o", "json").stdout)
    assert grown["properties"]["sizeBytes"] == 2 * MiB
    st = json.loads(daemon.cli("daemon", "status", "-o", "json").stdout)
    assert st["apiVersions"] == ["2026-11-01"]
    assert st["health"]["status"] == "Healthy"
    r = daemon.cli("-o", "json", "disk", "delete", "j")
    assert r.stdout == ""


def test_empty_list(daemon):
    r = daemon.cli("disk", "list")
    assert r.stdout == ""
    assert "no disks" in r.stderr
    assert json.loads(daemon.cli("disk", "list", "-o", "json").stdout) == {"value": []}


def test_adopt_with_path(daemon, tmp_path):
    img = tmp_path / "img.raw"
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
    f = fields(daemon.cli("disk", "create", "ad", "--path", img, "--kind", "shared").stdout)
    assert f["Origin"] == "adopted"
    assert f["Size"] == "8 MiB (8388608 bytes)"
    assert f["Path"] == os.path.realpath(img)
    daemon.cli("disk", "delete", "ad")
    assert img.exists()


def test_server_errors_exit_1(daemon):
    r = daemon.cli("disk", "show", "nope", check=False)
    assert r.returncode == 1
    assert r.stdout == ""
    assert "disk 'nope' not found" in r.stderr
    assert "NotFound" in r.stderr and "404" in r.stderr

    daemon.cli("disk", "create", "a", "--size", "1M")
    r = daemon.cli("disk", "create", "a", "--size", "2M", check=False)
    assert r.returncode == 1 and "already exists" in r.stderr
    r = daemon.cli("disk", "resize", "a", "--size", "512K", check=False)
    assert r.returncode == 1 and "only grow" in r.stderr
    r = daemon.cli("disk", "create", "b", "--size", "1000", check=False)
    assert r.returncode == 1 and "multiple of 512" in r.stderr
    r = daemon.cli("disk", "create", "../etc", "--size", "1M", check=False)
    assert r.returncode == 1 and "disk name" in r.stderr
    r = daemon.cli("disk", "create", "c", "--path", "/nonexistent/file", check=False)
    assert r.returncode == 1 and "does not exist" in r.stderr
    r = daemon.cli("disk", "create", "c", "--size", "1M", "--kind", "gold", check=False)
    assert r.returncode == 1 and "kind" in r.stderr

    # With -o json the error body is printed too, for scripts.
    r = daemon.cli("-o", "json", "disk", "delete", "nope", check=False)
    assert r.returncode == 1
    assert json.loads(r.stdout)["error"]["code"] == "NotFound"


def test_delete_attached_needs_force(daemon):
    nbd = pytest.importorskip("nbd")
    daemon.cli("disk", "create", "busy", "--size", "1M")
    h = nbd.NBD()
    h.connect_uri(daemon.nbd_uri("busy"))
    assert fields(daemon.cli("disk", "show", "busy").stdout)["State"] == "Attached"
    r = daemon.cli("disk", "delete", "busy", check=False)
    assert r.returncode == 1
    assert "attached" in r.stderr and "Conflict" in r.stderr
    r = daemon.cli("disk", "delete", "busy", "--force")
    assert r.returncode == 0
    del h


def test_usage_errors_exit_2(daemon):
    for args in (
        [],
        ["frobnicate"],
        ["disk"],
        ["disk", "explode"],
        ["disk", "create"],
        ["disk", "create", "x"],
        ["disk", "create", "x", "--size", "1G", "--path", "/tmp/x"],
        ["disk", "create", "x", "--size", "10GB"],
        ["disk", "create", "x", "--size", "lots"],
        ["disk", "create", "x", "--size", "1G", "--colour", "red"],
        ["disk", "show"],
        ["disk", "show", "a", "b"],
        ["disk", "resize", "x"],
        ["-o", "yaml", "disk", "list"],
    ):
        r = daemon.cli(*args, check=False)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("rpoint"), (args, r.stderr)
    # Nothing reached the daemon.
    assert daemon.api("GET", "/disks").json == {"value": []}


def test_help_and_version():
    r = rpoint("--help")
    assert r.returncode == 0
    for verb in ("disk create", "disk list", "disk show", "disk resize", "disk delete"):
        assert verb in r.stdout
    assert "--socket" in r.stdout and "RPOINT_SOCKET" in r.stdout
    r = rpoint("disk", "create", "--help")
    assert r.returncode == 0 and "--size" in r.stdout and "--path" in r.stdout
    r = rpoint("disk", "--help")
    assert r.returncode == 0 and "rpoint disk delete NAME [--force]" in r.stdout
    r = rpoint("--version")
    assert r.returncode == 0 and r.stdout.startswith("rpoint 0.")


def test_unreachable_daemon_exits_3(tmp_path, make_daemon):
    r = rpoint("--socket", tmp_path / "none.sock", "disk", "list")
    assert r.returncode == 3
    assert "cannot connect to rpointd at" in r.stderr and "none.sock" in r.stderr
    # A stale socket file nobody listens on.
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / "stale.sock"))
    s.close()
    r = rpoint("--socket", tmp_path / "stale.sock", "disk", "show", "x")
    assert r.returncode == 3 and "refused" in r.stderr.lower()
    # A daemon that has stopped.
    d = make_daemon().start()
    d.cli("disk", "list")
    d.stop()
    r = d.cli("disk", "list", check=False)
    assert r.returncode == 3


def test_socket_from_environment(daemon):
    env = {"RPOINT_SOCKET": daemon.control_sock}
    r = rpoint("disk", "create", "e", "--size", "1M", env=env)
    assert r.returncode == 0, r.stderr
    assert rpoint("disk", "list", env=env).stdout.splitlines()[1].split()[0] == "e"
    # --socket wins over the environment.
    r = rpoint("--socket", "/nonexistent.sock", "disk", "list", env=env)
    assert r.returncode == 3
    # Without either, the daemon's default path is used (nothing listens there in tests,
    # unless a system rpointd runs: then any answer but "unreachable at the default" is fine).
    r = rpoint("disk", "list")
    if r.returncode == 3:
        # /var/lib/rpointd/control.sock when that socket exists, else /run/rpointd/control.sock.
        expected = ("/var/lib/rpointd/control.sock"
                    if os.path.exists("/var/lib/rpointd/control.sock") else "/run/rpointd/control.sock")
        assert expected in r.stderr


def test_daemon_status(daemon):
    f = fields(daemon.cli("daemon", "status").stdout)
    assert f["Daemon"].startswith("rpointd ")
    assert f["API versions"] == "2026-11-01"
    assert f["Socket"] == daemon.control_sock
    assert f["Health"].startswith("Healthy")


def test_adopt_relative_path(daemon, tmp_path):
    img = tmp_path / "rel.raw"
    with open(img, "wb") as f:
        f.truncate(MiB)
    r = subprocess.run([RPOINT_CLI, "--socket", daemon.control_sock, "disk", "create", "rel",
                        "--path", "rel.raw"], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert fields(r.stdout)["Path"] == os.path.realpath(img)
