"""The short CI run of tests/soak/kill9-soak: random kill -9 under a stamped write
load on two disks of a VM, points cut in between and started just before the kill
(or killed the moment one succeeds). The long run (1000 rounds) is recorded in
bench/RESULTS.md."""
import os
import subprocess
import sys

from rpointd_harness import BUILD, REPO

QUICK = os.environ.get("RPOINTD_QUICK") == "1"


def test_kill9_soak_short():
    rounds = os.environ.get("RPOINTD_SOAK_ROUNDS", "8" if QUICK else "16")
    r = subprocess.run([sys.executable, os.path.join(REPO, "tests", "soak", "kill9-soak"),
                        "--rounds", rounds],
                       env=dict(os.environ, RPOINTD_BUILD_DIR=BUILD),
                       capture_output=True, text=True, timeout=600)
    print(r.stdout)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-6000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith(f"kill9-soak: {rounds} rounds,") and " 0 lost, 0 divergences" in last, last
