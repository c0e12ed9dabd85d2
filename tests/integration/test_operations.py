"""Long-running operations are listed and pruned (issue #10, "Operations").

GET /operations lists the retained operations newest first, each in the shape
GET /operations/{id} returns. Ended operations are kept for
operations.retention_seconds and at most operations.max_count of them; an
operation still InProgress is never pruned. Pruning survives a restart (the
records live in metadata.db) and `rpoint operation list` prints them.
"""
import json
import subprocess
import time

from rpointd_harness import Daemon, operation_path

MiB = 1 << 20


def setup_vm(d):
    d.create_disk("d0", 4 * MiB)
    d.create_vm("vm", ["d0"])
    d.create_collection("c", "vm")


def op_ids(d):
    r = d.api("GET", "/operations")
    assert r.status == 200, r
    assert isinstance(r.json["value"], list), r
    for op in r.json["value"]:
        assert op["id"] == "/operations/" + op["name"], op
        one = d.api("GET", op["id"])
        assert one.status == 200, one
        assert one.json["properties"]["kind"] == op["properties"]["kind"]
    return [op["name"] for op in r.json["value"]]


def create_point(d, name):
    r = d.start_restore_point("c", name)
    assert r.status == 201, r
    op = operation_path(r).rsplit("/", 1)[1]
    d.wait_operation(op)
    return op


def test_list_newest_first_and_count_limit(tmp_path):
    d = Daemon(tmp_path / "state", config_text="operations: {max_count: 3}\n").start()
    try:
        setup_vm(d)
        assert op_ids(d) == []
        ops = [create_point(d, f"rp{i}") for i in range(5)]
        # Newest first, only the last three kept.
        assert op_ids(d) == list(reversed(ops[2:]))
        for old in ops[:2]:
            r = d.api("GET", f"/operations/{old}")
            assert r.status == 404 and r.json["error"]["code"], r
        # The records are in metadata.db: a restart keeps exactly these.
        d.restart()
        assert op_ids(d) == list(reversed(ops[2:]))
    finally:
        d.stop()


def test_retention_window_prunes_ended_but_never_in_progress(tmp_path):
    d = Daemon(tmp_path / "state",
               config_text="operations: {retention_seconds: 2, max_count: 100}\n").start()
    try:
        setup_vm(d)
        first = create_point(d, "rp0")
        assert op_ids(d) == [first]
        time.sleep(2.5)
        # Past the window: the ended operation goes, from the list and by id.
        second = create_point(d, "rp1")
        assert op_ids(d) == [second]
        assert d.api("GET", f"/operations/{first}").status == 404
    finally:
        d.stop()


def test_in_progress_operation_is_kept_past_the_window(tmp_path):
    hook = tmp_path / "freeze.sh"
    hook.write_text("#!/bin/sh\nsleep 4\n")
    hook.chmod(0o755)
    cfg = (f"operations: {{retention_seconds: 1, max_count: 1}}\n"
           f"consistency: {{freeze: {json.dumps(str(hook))}, hook_timeout_seconds: 30}}\n")
    d = Daemon(tmp_path / "state", config_text=cfg).start()
    try:
        setup_vm(d)
        done = create_point(d, "rp0")  # crash-consistent: no hook
        # File-system consistent: the freeze hook holds it InProgress for 4 s.
        r = d.start_restore_point("c", "rp1", consistency="FileSystemConsistent")
        assert r.status == 201, r
        running = operation_path(r).rsplit("/", 1)[1]
        time.sleep(2)
        # rp0's operation ended more than 1 s ago and max_count is 1: pruning
        # (every list prunes) may drop it, never the running one.
        ids = op_ids(d)
        assert running in ids, ids
        assert done not in ids, ids
        op = d.wait_operation(running)
        assert op["status"] == "Succeeded", op
        assert op_ids(d) == [running]
    finally:
        d.stop()


def test_cli_operation_list(tmp_path):
    d = Daemon(tmp_path / "state").start()
    try:
        r = d.cli("operation", "list")
        assert r.returncode == 0 and "no operations" in r.stderr, r
        setup_vm(d)
        op = create_point(d, "rp0")
        r = d.cli("operation", "list")
        assert r.returncode == 0, r
        lines = r.stdout.splitlines()
        assert lines[0].split()[:3] == ["OPERATION", "KIND", "STATUS"], r.stdout
        assert lines[1].split()[:3] == [op, "CreateRestorePoint", "Succeeded"], r.stdout
        r = d.cli("--output", "json", "operation", "list")
        assert r.returncode == 0, r
        assert [o["name"] for o in json.loads(r.stdout)["value"]] == [op]
    finally:
        d.stop()


def test_config_rejects_bad_values(tmp_path):
    for i, bad in enumerate(("operations: {retention_seconds: 0}\n",
                             "operations: {max_count: -1}\n", "operations: {retention: 5}\n")):
        state = tmp_path / f"state{i}"
        state.mkdir()
        d = Daemon(state, config_text=bad)
        p = subprocess.run(d.args() + ["--check-config"], capture_output=True, text=True,
                           timeout=30)
        assert p.returncode != 0, (bad, p)
        assert "operations" in p.stderr, (bad, p.stderr)
