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
