"""pytest wrapper of tests/vm/power-loss (./test runs it as its own stage, "vm").

Boots rpointd in a VM and cuts its power (SIGKILL of qemu) 20 times, checking
after each reboot that acknowledged+flushed writes, Succeeded restore points and
the next incremental point are all exact (see tests/vm/README.md). 5 cuts under
RPOINTD_QUICK=1, RPOINTD_VM_CUTS=N to choose.

The lane installs what it needs (tests/vm/install.sh). Outside CI, a machine
where it cannot (no root, no network) skips; under CI=true that fails.
"""
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BUILD = os.environ.get("RPOINTD_BUILD_DIR", os.path.join(REPO, "build"))
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def cuts():
    if os.environ.get("RPOINTD_VM_CUTS"):
        return int(os.environ["RPOINTD_VM_CUTS"])
    return 5 if os.environ.get("RPOINTD_QUICK") == "1" else 20


@pytest.mark.timeout(1700)
def test_power_loss_keeps_acked_writes_and_points_exact(tmp_path):
    if not CI and os.geteuid() != 0 and shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 missing and not root to install it (tests/vm/install.sh)")
    r = subprocess.run([sys.executable, os.path.join(HERE, "power-loss"), "--cuts", str(cuts()),
                        "--build", BUILD, "--workdir", str(tmp_path / "pl"), "-v"],
                       capture_output=True, text=True, timeout=1650)
    print(r.stdout[-20000:])
    print(r.stderr[-5000:], file=sys.stderr)
    summary = [x for x in r.stdout.splitlines() if x.startswith("power-loss:")]
    assert r.returncode == 0, "\n".join(summary) or r.stdout[-3000:]
    assert summary and " 0 divergences" in summary[-1], summary


# ---- the checker itself, on the host (no VM, a few seconds) ----
# pl_tool check must not be vacuous: the same write/record/check cycle against a
# host rpointd passes untouched, and flags a block reverted behind its back.

sys.path.insert(0, os.path.join(REPO, "tests", "integration"))
PL_TOOL = os.path.join(BUILD, "tests", "vm", "pl_tool")
RPOINT = os.path.join(BUILD, "cli", "rpoint")
BLOCKS, BATCH = 256, 16


def _pl(d, mode, boot, *extra):
    return [PL_TOOL, mode, "--nbd", d.nbd_sock, "--control", d.control_sock, "--rpoint", RPOINT,
            "--disk", "da", "--disk", "db", "--blocks", str(BLOCKS), "--batch", str(BATCH),
            "--seed", "7", "--boot", str(boot), *extra]


def _write_a_while(d, tmp_path, boot):
    """Runs the writer (flushing after every batch) until it made a point."""
    import time
    rec = tmp_path / f"rec-{boot}"
    rec.write_text("")
    p = subprocess.Popen(_pl(d, "write", boot, "--record", str(rec), "--flush-pct", "100",
                             "--point-every", "4"), stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while " done " not in rec.read_text() and time.monotonic() < deadline:
        assert p.poll() is None, f"writer exited {p.returncode}"
        time.sleep(0.05)
    time.sleep(0.3)
    p.kill()
    p.wait()
    lines = rec.read_text().split("\n")[:-1]
    assert any(" done " in x for x in lines), lines[-5:]
    return lines


def _check(d, tmp_path, boot, record):
    rf = tmp_path / "record.txt"
    rf.write_text("\n".join(record) + "\n")
    succ = tmp_path / "succeeded"
    r = subprocess.run([RPOINT, "--socket", d.control_sock, "restore-point", "list", "c"],
                       capture_output=True, text=True, check=True)
    succ.write_text("".join(x.split()[0] + "\n" for x in r.stdout.splitlines()[1:]
                            if x.split()[1:2] == ["Succeeded"]))
    return subprocess.run(_pl(d, "check", boot, "--record", str(rf), "--succeeded", str(succ),
                              "--baseline", str(tmp_path / f"base-{boot - 1}"),
                              "--new-baseline", str(tmp_path / f"base-{boot}"),
                              "--next-point", f"b{boot}r"),
                          capture_output=True, text=True)


def test_checker_passes_intact_disks_and_flags_a_lost_flushed_write(tmp_path):
    from rpointd_harness import Daemon, nbd_write

    d = Daemon(tmp_path / "state").start()
    try:
        for disk in ("da", "db"):
            d.create_disk(disk, BLOCKS * 4096)
        d.create_vm("vm", ["da", "db"])
        d.create_collection("c", "vm")
        r = _check(d, tmp_path, 1, [])
        assert r.returncode == 0, r.stdout + r.stderr
        record = _write_a_while(d, tmp_path, 1)
        r = _check(d, tmp_path, 2, record)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "divergences=0" in r.stdout and "points=" in r.stdout, r.stdout
        assert " points=0 " not in r.stdout, r.stdout  # the writer's point was checked
        # A flushed write vanishes (the block goes back to zeroes): a divergence.
        nbd_write(d.nbd_uri("db"), [(0, bytes(4096 * BLOCKS))])
        r = _check(d, tmp_path, 3, record)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "acknowledged after a completed flush" in r.stdout, r.stdout
    finally:
        d.stop()
