"""The rpoint verbs for VMs, collections, restore points, restores, operations
and regions, against the real daemon: -o json is the server's JSON, tables by
default, --wait, and exit codes (0 ok, 1 server error / failed operation,
2 usage, 3 unreachable; verify --wait: 4 when damage was found; the contract
said 3, which rpoint(1) already uses for "unreachable", so rp-api made it 4).
"""
import json
import os
import random
import subprocess
import time

import pytest

from rpointd_harness import RPOINT_CLI, images_equal, nbd_save, nbd_write, operation_path

MiB = 1 << 20
G = 64 << 10


def rpoint(d, *args, stdin=None):
    return subprocess.run([RPOINT_CLI, "--socket", d.control_sock] + [str(a) for a in args],
                          capture_output=True, text=True, timeout=120, input=stdin)


def ok(r):
    assert r.returncode == 0, f"exit {r.returncode}: {r.stdout}\n{r.stderr}"
    return r


def js(r):
    return json.loads(ok(r).stdout)


@pytest.fixture
def vm(daemon, tmp_path):
    d = daemon
    d.create_disk("a", 16 * MiB)
    d.create_disk("b", 8 * MiB)
    d.create_disk("scratch", 8 * MiB, kind="ephemeral")
    rng = random.Random(1)
    nbd_write(d.nbd_uri("a"), [(s * G, rng.randbytes(G)) for s in rng.sample(range(256), 20)])
    nbd_write(d.nbd_uri("b"), [(0, rng.randbytes(G))])
    cfg = tmp_path / "vm.json"
    cfg.write_text(json.dumps({"cpus": 4, "name": "web"}))
    r = ok(rpoint(d, "vm", "create", "web", "--disk", "a", "--disk", "b", "--disk", "scratch",
                  "--config", cfg))
    assert "web" in r.stdout
    return d


def test_vm_and_collection_verbs(vm):
    d = vm
    assert js(rpoint(d, "vm", "show", "web", "-o", "json")) == d.api("GET", "/vms/web").json
    assert d.api("GET", "/vms/web").json["properties"]["configuration"] == {"cpus": 4,
                                                                            "name": "web"}
    assert js(rpoint(d, "-o", "json", "vm", "list")) == d.api("GET", "/vms").json
    lines = ok(rpoint(d, "vm", "list")).stdout.splitlines()
    assert lines[0].split()[0] == "NAME" and any(l.split()[0] == "web" for l in lines[1:])

    # --config - reads stdin.
    d.create_disk("x", MiB)
    ok(rpoint(d, "vm", "create", "v2", "--disk", "x", "--config", "-", stdin='{"k": [1, 2]}'))
    assert d.api("GET", "/vms/v2").json["properties"]["configuration"] == {"k": [1, 2]}

    c = js(rpoint(d, "collection", "create", "col", "--vm", "web", "-o", "json"))
    assert c == d.api("GET", "/restorePointCollections/col").json
    assert c["location"] == "local"
    assert js(rpoint(d, "collection", "list", "-o", "json")) == \
        d.api("GET", "/restorePointCollections").json
    assert "col" in ok(rpoint(d, "collection", "show", "col")).stdout
    regions = js(rpoint(d, "region", "list", "-o", "json"))
    assert [x["name"] for x in regions["value"]] == ["local"]
    assert "local" in ok(rpoint(d, "region", "list")).stdout

    # Server errors: exit 1 with the server's message.
    # (a second collection of a VM is fine; an existing one cannot change VM)
    r = rpoint(d, "collection", "create", "col", "--vm", "v2")
    assert r.returncode == 1 and "409" in r.stderr, r
    r = rpoint(d, "collection", "create", "col3", "--vm", "web", "--region", "mars")
    assert r.returncode == 1 and "400" in r.stderr, r
    r = rpoint(d, "vm", "create", "v3", "--disk", "nope")
    assert r.returncode == 1 and "nope" in r.stderr, r
    r = rpoint(d, "vm", "show", "nope")
    assert r.returncode == 1 and "404" in r.stderr, r
    # Usage errors: exit 2, nothing sent.
    assert rpoint(d, "collection", "create", "c9").returncode == 2       # no --vm
    assert rpoint(d, "restore-point", "create", "no-slash").returncode == 2
    assert rpoint(d, "restore-point", "create", "col/rp", "--consistency", "bogus").returncode == 2
    assert rpoint(d, "vm", "frobnicate").returncode == 2
    assert d.api("GET", "/restorePointCollections/c9").status == 404
    # Unreachable: exit 3.
    r = subprocess.run([RPOINT_CLI, "--socket", "/nonexistent/sock", "collection", "list"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 3, r

    ok(rpoint(d, "vm", "delete", "v2"))
    assert d.api("GET", "/vms/v2").status == 404
    ok(rpoint(d, "collection", "delete", "col"))
    assert d.api("GET", "/restorePointCollections/col").status == 404


def test_restore_point_verbs(vm, tmp_path):
    d = vm
    ok(rpoint(d, "collection", "create", "col", "--vm", "web"))
    img_a = nbd_save(d.nbd_uri("a"), tmp_path / "a.img")

    # The ephemeral disk must be excluded: exit 1 naming it.
    r = rpoint(d, "restore-point", "create", "col/rp1", "--wait")
    assert r.returncode == 1 and "scratch" in r.stderr, r
    r = rpoint(d, "restore-point", "create", "col/rp1", "--exclude-disk", "scratch", "--wait",
               "-o", "json")
    rp = js(r)
    assert rp["properties"]["provisioningState"] == "Succeeded", rp
    assert rp["name"] == "rp1"
    api = d.get_restore_point("col", "rp1")
    assert rp["properties"]["excludeDisks"] == api["properties"]["excludeDisks"] == \
        [{"id": "/disks/scratch"}]
    assert js(rpoint(d, "restore-point", "show", "col/rp1", "-o", "json"))["id"] == api["id"]
    assert [x["name"] for x in js(rpoint(d, "restore-point", "list", "col", "-o",
                                         "json"))["value"]] == ["rp1"]
    table = ok(rpoint(d, "restore-point", "show", "col/rp1")).stdout
    assert "Succeeded" in table and "rp1" in table, table
    assert "rp1" in ok(rpoint(d, "restore-point", "list", "col")).stdout

    # Without --wait: answers at once with the point Creating and an operation to poll.
    r = js(rpoint(d, "restore-point", "create", "col/rp2", "--exclude-disk", "scratch",
                  "--consistency", "crash", "-o", "json"))
    assert r["properties"]["provisioningState"] in ("Creating", "Succeeded"), r
    for _ in range(600):
        if d.get_restore_point("col", "rp2")["properties"]["provisioningState"] != "Creating":
            break
        time.sleep(0.05)
    assert d.get_restore_point("col", "rp2")["properties"]["provisioningState"] == "Succeeded"
    # operation show: of an operation started through the API (its id is in the headers).
    resp = d.start_restore_point("col", "rp4", exclude=["scratch"])
    op_path = operation_path(resp)
    d.wait_operation(op_path)
    op = js(rpoint(d, "operation", "show", op_path.rsplit("/", 1)[1], "-o", "json"))
    assert op == d.api("GET", op_path).json, op
    assert op["status"] == "Succeeded" and op["properties"]["kind"] == "CreateRestorePoint", op
    assert "Succeeded" in ok(rpoint(d, "operation", "show", op_path.rsplit("/", 1)[1])).stdout
    # FileSystemConsistent without hooks: refused.
    r = rpoint(d, "restore-point", "create", "col/rp3", "--exclude-disk", "scratch",
               "--consistency", "fs")
    assert r.returncode == 1 and "400" in r.stderr, r

    # verify --wait: 0 when clean.
    r = ok(rpoint(d, "restore-point", "verify", "col/rp1", "--wait"))
    assert "OK" in r.stdout, r.stdout
    r = js(rpoint(d, "restore-point", "verify", "col/rp1", "--wait", "-o", "json"))
    assert r["properties"]["output"]["ok"] is True, r

    # disk create --from, vm restore.
    ok(rpoint(d, "disk", "create", "ra", "--from", "col/rp1/a", "--wait"))
    same, msg = images_equal(img_a, nbd_save(d.nbd_uri("ra"), tmp_path / "ra"))
    assert same, msg
    ok(rpoint(d, "vm", "restore", "col/rp1", "web2", "--disk-name", "a=web2-os", "--wait"))
    vm2 = d.api("GET", "/vms/web2").json
    assert [x["id"] for x in vm2["properties"]["disks"]] == ["/disks/web2-os", "/disks/web2-b"]
    assert vm2["properties"]["configuration"] == {"cpus": 4, "name": "web"}
    r = rpoint(d, "vm", "restore", "col/rp1", "web2", "--wait")
    assert r.returncode == 1 and "409" in r.stderr, r
    r = rpoint(d, "disk", "create", "rb", "--from", "col/nope/a", "--wait")
    assert r.returncode == 1 and "404" in r.stderr, r

    ok(rpoint(d, "restore-point", "delete", "col/rp2"))
    assert d.api("GET", "/restorePointCollections/col/restorePoints/rp2").status == 404
    r = rpoint(d, "restore-point", "delete", "col/rp2")
    assert r.returncode == 1, r


def test_verify_wait_exit_4_on_damage(vm):
    d = vm
    ok(rpoint(d, "collection", "create", "col", "--vm", "web"))
    ok(rpoint(d, "restore-point", "create", "col/rp", "--exclude-disk", "scratch", "--wait"))
    region = d.api("GET", "/regions").json["value"][0]["properties"]["path"]
    packs = []
    for root, _, files in os.walk(os.path.join(region, "packs")):
        packs += [os.path.join(root, f) for f in files if f.endswith(".pack")]
    assert packs, "no pack files"
    # Damage the first object of every pack (a chunk or a page the point uses).
    for p in packs:
        with open(p, "r+b") as f:
            f.seek(4096 + 100)
            b = f.read(1)
            f.seek(4096 + 100)
            f.write(bytes([b[0] ^ 1]))
    r = rpoint(d, "restore-point", "verify", "col/rp", "--wait")
    assert r.returncode == 4, f"exit {r.returncode}: {r.stdout}\n{r.stderr}"
    assert "DAMAGED" in r.stdout, r.stdout
    r = rpoint(d, "-o", "json", "restore-point", "verify", "col/rp", "--wait")
    assert r.returncode == 4, r
    assert json.loads(r.stdout)["properties"]["output"]["ok"] is False


def test_wait_on_a_rerun_waits_for_what_already_exists(make_daemon, tmp_path):
    """A PUT repeated for a point, copy or restore that exists answers 200 with
    no operation; --wait still waits for its provisioningState: exit 0 once
    Succeeded, 1 with the error when Failed (it used to exit 0 at once)."""
    faults = tmp_path / "faults"
    faults.write_text("\n")
    cfg = ("regions:\n"
           f"  - {{name: east, path: {tmp_path}/east, default: true}}\n"
           f"  - {{name: west, path: {tmp_path}/west}}\n"
           "consistency:\n"
           "  vms:\n"
           '    slow: {freeze: "sleep 3", thaw: "true"}\n'
           '    bad: {freeze: "echo frozen-out >&2; exit 7", thaw: "true"}\n')
    d = make_daemon(config_text=cfg, env={"RPOINTD_FAULTS_FILE": str(faults)}).start()
    d.create_disk("a", 16 * MiB)
    d.create_disk("b", 4 * MiB)
    rng = random.Random(5)
    nbd_write(d.nbd_uri("a"), [(s * G, rng.randbytes(G)) for s in rng.sample(range(256), 64)])
    d.create_vm("slow", ["a"])
    d.create_vm("bad", ["b"])
    d.create_collection("ce", "slow", location="east")
    d.create_collection("cw", "slow", location="west")
    d.create_collection("cb", "bad")

    def state(c, rp):
        return d.get_restore_point(c, rp)["properties"]["provisioningState"]

    # A point still Creating (its freeze takes 3 s): the rerun waits for it.
    r = js(rpoint(d, "restore-point", "create", "ce/p1", "--consistency", "fs", "-o", "json"))
    assert r["properties"]["provisioningState"] == "Creating", r
    r = ok(rpoint(d, "restore-point", "create", "ce/p1", "--consistency", "fs", "--wait"))
    assert state("ce", "p1") == "Succeeded", r.stderr
    assert "Succeeded" in r.stdout, r.stdout

    # A Failed point: the first --wait and the rerun both exit 1 saying why.
    r = rpoint(d, "restore-point", "create", "cb/p", "--consistency", "fs", "--wait")
    assert r.returncode == 1, r
    assert state("cb", "p") == "Failed"
    r = rpoint(d, "restore-point", "create", "cb/p", "--consistency", "fs", "--wait")
    assert r.returncode == 1, r
    assert "Failed" in r.stderr and "FreezeFailed" in r.stderr, r.stderr

    # A copy still Creating (each chunk delayed): the rerun waits for it.
    d.arm_faults("copy.chunk=delay100")
    r = js(rpoint(d, "restore-point", "copy", "ce/p1", "cw", "-o", "json"))
    assert r["properties"]["provisioningState"] == "Creating", r
    r = ok(rpoint(d, "restore-point", "copy", "ce/p1", "cw", "--wait"))
    assert state("cw", "p1") == "Succeeded", r.stderr
    d.arm_faults("")

    # A restore still Creating (each piece delayed): the rerun waits for it.
    d.arm_faults("restore.fill=delay1000")
    ok(rpoint(d, "disk", "create", "ra", "--from", "ce/p1/a"))
    assert d.api("GET", "/disks/ra").json["properties"]["provisioningState"] == "Creating"
    r = ok(rpoint(d, "disk", "create", "ra", "--from", "ce/p1/a", "--wait"))
    assert d.api("GET", "/disks/ra").json["properties"]["provisioningState"] == "Succeeded", r
    d.arm_faults("")


def test_access_grant_duration_error_says_seconds(daemon):
    d = daemon
    d.create_disk("a", 4 * MiB)
    d.create_vm("vm", ["a"])
    d.create_collection("col", "vm")
    d.create_restore_point("col", "p")
    r = d.api("POST", "/restorePointCollections/col/restorePoints/p/diskRestorePoints/a/beginGetAccess",
              {"access": "Read", "durationInSeconds": "an hour"})
    assert r.status == 400, r
    msg = r.json["error"]["message"]
    assert "durationInSeconds" in msg and "seconds" in msg and "bytes" not in msg, msg
