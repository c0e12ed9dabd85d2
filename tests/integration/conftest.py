import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from rpointd_harness import Daemon  # noqa: E402


def strict():
    """Under CI (CI=true) a skip is a failure: every tool a test needs is one the
    project installs (scripts/packages.txt), so a missing one is a broken install,
    not a reason to pass. RPOINTD_STRICT=1 asks for the same outside CI."""
    return (os.environ.get("CI", "").lower() in ("true", "1", "yes")
            or os.environ.get("RPOINTD_STRICT", "") not in ("", "0"))


def require(*tools):
    """Skip when a client tool is missing, as nbdkit's tests do; under CI the
    skip becomes a failure (see strict() and the hooks below)."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip("missing tools: " + ", ".join(missing))


def _strict_skip(rep, where):
    if strict() and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"skipped {where} under CI=true, and a skip is not a pass: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _strict_skip(outcome.get_result(), "at run time")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # A module-level pytest.importorskip("nbd") skips the whole file at collection.
    outcome = yield
    _strict_skip(outcome.get_result(), "at collection")


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
