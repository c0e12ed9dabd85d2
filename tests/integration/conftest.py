import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from rpointd_harness import Daemon  # noqa: E402


def require(*tools):
    """Skip (not fail) when a client tool is missing, as nbdkit's tests do."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip("missing tools: " + ", ".join(missing))


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path / "state").start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        rc = d.stop()
        assert rc == 0, "rpointd did not exit 0 on SIGTERM:\n" + d.log()
    elif d.proc is not None:
        # The daemon died during the test: that is a failure unless the test killed it.
        pytest.fail(f"rpointd died (rc={d.proc.returncode}):\n{d.log()}")


@pytest.fixture
def make_daemon(tmp_path):
    """Factory for tests that need their own flags, config or several daemons."""
    made = []

    def make(name="state", **kw):
        d = Daemon(tmp_path / name, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        if d.proc is not None:
            d.kill9()
