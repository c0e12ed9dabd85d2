"""The rpointd process: flags, configuration, sockets, signals and systemd.

Everything here runs the real binary; systemd integration is checked with
systemd's own tools (systemd-socket-activate, systemd-analyze verify) and a
NOTIFY_SOCKET this test reads, as systemd would.
"""
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time

import pytest

from conftest import require
from rpointd_harness import REPO, RPOINTD, Daemon, UnixHTTPConnection

EXAMPLE_CONFIG = os.path.join(REPO, "config", "rpointd.yaml")
UNITS = [os.path.join(REPO, "systemd", u) for u in ("rpointd.service", "rpointd.socket", "rpointd-nbd.socket")]


def run(*args, timeout=30, env=None, cwd=None):
    return subprocess.run([RPOINTD] + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_root(sock_path, timeout=5):
    conn = UnixHTTPConnection(sock_path, timeout=timeout)
    try:
        conn.request("GET", "/")
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def wait_for(pred, timeout=20, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if pred():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_raw(tmp_path, args, env=None, name="raw"):
    """Starts rpointd with exactly `args` (no harness defaults); returns (proc, log path)."""
    log_path = tmp_path / f"{name}.log"
    full_env = dict(os.environ)
    full_env.pop("NOTIFY_SOCKET", None)
    full_env.pop("LISTEN_FDS", None)
    full_env.update(env or {})
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([RPOINTD] + [str(a) for a in args], stdout=log, stderr=log, env=full_env)
    return proc, log_path


def stop(proc, sig=signal.SIGTERM, timeout=30):
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


# --- flags -----------------------------------------------------------------

def test_help_and_version():
    r = run("--help")
    assert r.returncode == 0, r.stderr
    for flag in ("--config", "--state-dir", "--log-level", "--check-config", "--version", "--help"):
        assert flag in r.stdout
    r = run("--version")
    assert r.returncode == 0
    assert re.fullmatch(r"rpointd \d+\.\d+\.\d+\S*\n", r.stdout), r.stdout


@pytest.mark.parametrize("args, needle", [
    (["--bogus"], "bogus"),
    (["stray-word"], "positional"),
    (["--state-dir"], "state-dir"),
    (["--log-level", "loud"], "log.level"),
    (["--config", "/nonexistent/rpointd.yaml"], "/nonexistent/rpointd.yaml"),
    (["--state-dir", "x", "--state-dir", "y"], "state-dir"),
])
def test_bad_flags_exit_2_before_starting(tmp_path, args, needle):
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert needle in r.stderr
    assert r.stdout == ""
    # Nothing was started or created.
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# --- configuration -----------------------------------------------------------

def test_check_config_prints_effective_defaults(tmp_path):
    state = tmp_path / "st"
    r = run("--state-dir", state, "--check-config")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"state_dir: {state}\n" in out
    assert f"socket: {state}/control.sock" in out
    assert f"socket: {state}/nbd.sock" in out
    assert f"disks_dir: {state}/disks" in out
    assert f"metadata_db: {state}/metadata.db" in out
    assert not state.exists(), "--check-config must not create anything"


def test_check_config_example_file_and_round_trip(tmp_path):
    r = run("--config", EXAMPLE_CONFIG, "--check-config")
    assert r.returncode == 0, r.stderr
    assert "socket: /run/rpointd/control.sock" in r.stdout
    assert "state_dir: /var/lib/rpointd" in r.stdout
    # The printed configuration is itself a valid config that prints the same.
    again = tmp_path / "effective.yaml"
    again.write_text(r.stdout)
    r2 = run("--config", again, "--check-config")
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout == r.stdout


def test_relative_paths(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    cfg = etc / "r.yaml"
    cfg.write_text("state_dir: ../var\ncontrol:\n  socket: run/c.sock\n")
    r = run("--config", cfg, "--check-config")
    assert r.returncode == 0, r.stderr
    assert f"state_dir: {tmp_path}/var\n" in r.stdout           # relative to the file
    assert f"socket: {tmp_path}/var/run/c.sock" in r.stdout     # relative to state_dir
    # --state-dir is relative to the working directory, and wins.
    r = subprocess.run([RPOINTD, "--config", str(cfg), "--state-dir", "here", "--check-config"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"state_dir: {tmp_path}/here\n" in r.stdout


@pytest.mark.parametrize("text, key, line", [
    ("io:\n  queue_depth: 0\n", "io.queue_depth", 2),
    ("io:\n  threads: 2\n  queue_depth: 40000\n", "io.queue_depth", 3),
    ("control:\n  mode: 0999\n", "control.mode", 2),
    ("nbd:\n  tcp: '127.0.0.1:99999'\n", "nbd.tcp", 2),
    ("nbd:\n  tcp: '::1:10809'\n", "nbd.tcp", 2),
    ("log:\n  level: verbose\n", "log.level", 2),
    ("state_dir: /x\ncontrl:\n  mode: '0600'\n", "contrl", 2),
    ("io:\n  direct: perhaps\n", "io.direct", 2),
    ("io: 5\n", "io", 1),
    ("regions:\n  - {name: a, path: relative}\n", "regions[0].path", 2),
    ("control:\n  socket: /tmp/a.sock\nnbd:\n  socket: /tmp/a.sock\n", "nbd.socket", 4),
    ("io:\n  queue_depth: [\n", "YAML syntax error", 3),
])
def test_bad_config_exits_2_naming_key_and_line(tmp_path, text, key, line):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    state = tmp_path / "state"
    for extra in (["--check-config"], []):
        r = run("--config", cfg, "--state-dir", state, *extra)
        assert r.returncode == 2, (r.returncode, r.stderr)
        assert key in r.stderr, r.stderr
        assert f"{cfg}:{line}:" in r.stderr, r.stderr
        assert not state.exists(), "a bad config must stop rpointd before it creates anything"


# --- running ---------------------------------------------------------------

def test_state_dir_defaults_and_sigterm(tmp_path):
    state = tmp_path / "a" / "b" / "state"   # parents missing too: rpointd creates them
    proc, log = start_raw(tmp_path, ["--state-dir", state])
    try:
        wait_for(lambda: get_root(str(state / "control.sock")) == 200, what="control socket")
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
        for name in ("control.sock", "nbd.sock"):
            st = os.stat(state / name)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o660
        assert (state / "metadata.db").is_file()
        assert (state / "disks").is_dir()
        text = log.read_text()
        assert f"control API listening on unix:{state}/control.sock" in text
        assert f"NBD listening on unix:{state}/nbd.sock" in text
    finally:
        rc = stop(proc)
    assert rc == 0, log.read_text()
    assert "stopped" in log.read_text()
    # The daemon removes the socket files it made.
    assert not (state / "control.sock").exists()
    assert not (state / "nbd.sock").exists()


def test_sigint_exits_0(tmp_path):
    d = Daemon(tmp_path / "state").start()
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(30) == 0, d.log()
    d.proc = None


def test_disks_survive_restart_and_sync_on_stop(tmp_path):
    require("nbdinfo", "nbdcopy")
    d = Daemon(tmp_path / "state").start()
    try:
        d.create_disk("d1", 1 << 20)
        data = tmp_path / "data"
        data.write_bytes(os.urandom(1 << 20))
        subprocess.run(["nbdcopy", str(data), d.nbd_uri("d1")], check=True, timeout=60)
        d.restart()
        out = tmp_path / "out"
        subprocess.run(["nbdcopy", d.nbd_uri("d1"), str(out)], check=True, timeout=60)
        assert out.read_bytes() == data.read_bytes()
    finally:
        assert d.stop() == 0, d.log()


def test_custom_socket_modes(tmp_path):
    state = tmp_path / "state"
    d = Daemon(state, config_text="control:\n  mode: '0600'\nnbd:\n  mode: '0640'\n").start()
    try:
        assert stat.S_IMODE(os.stat(state / "control.sock").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(state / "nbd.sock").st_mode) == 0o640
    finally:
        assert d.stop() == 0, d.log()


def test_refuses_a_live_control_socket(tmp_path):
    a = Daemon(tmp_path / "a").start()
    try:
        # Another state dir, but told to use a's control socket.
        cfg = tmp_path / "b.yaml"
        cfg.write_text(f"control:\n  socket: {a.control_sock}\n")
        proc, log = start_raw(tmp_path, ["--state-dir", tmp_path / "b", "--config", cfg])
        assert proc.wait(30) == 1, log.read_text()
        text = log.read_text()
        assert "listening on " + a.control_sock in text, text
        # a is untouched and still answers.
        assert get_root(a.control_sock) == 200
        assert not (tmp_path / "b" / "nbd.sock").exists(), "the refused daemon cleans up what it made"
    finally:
        assert a.stop() == 0, a.log()


def test_refuses_a_state_dir_in_use(tmp_path):
    a = Daemon(tmp_path / "a").start()
    try:
        proc, log = start_raw(tmp_path, ["--state-dir", a.state_dir])
        assert proc.wait(30) == 1, log.read_text()
        assert f"another rpointd (pid {a.proc.pid})" in log.read_text()
        assert get_root(a.control_sock) == 200
    finally:
        assert a.stop() == 0, a.log()


def test_stale_socket_is_replaced_but_not_other_files(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    # A socket file whose process is gone (as after kill -9).
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(state / "control.sock"))
    s.close()
    d = Daemon(state).start()
    assert d.stop() == 0, d.log()
    assert "removing stale socket" in d.log()

    # A regular file where the socket should be is never deleted.
    (state / "nbd.sock").write_text("precious")
    proc, log = start_raw(tmp_path, ["--state-dir", state])
    assert proc.wait(30) == 1
    assert "is not a socket" in log.read_text()
    assert (state / "nbd.sock").read_text() == "precious"


def test_kill9_then_restart(tmp_path):
    d = Daemon(tmp_path / "state").start()
    d.kill9()  # leaves socket files and the lock file behind
    d.start()
    assert d.stop() == 0, d.log()


def test_tcp_listener(tmp_path):
    require("nbdinfo")
    port = free_port()
    d = Daemon(tmp_path / "state", config_text=f"nbd:\n  tcp: '127.0.0.1:{port}'\n").start()
    try:
        assert f"tcp:127.0.0.1:{port}" in d.log()
        d.create_disk("tcpdisk", 4 << 20)
        r = subprocess.run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}/tcpdisk"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == str(4 << 20)
    finally:
        assert d.stop() == 0, d.log()
    # The port is free again once the daemon is gone.
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_tcp_port_in_use_fails_start(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = tmp_path / "r.yaml"
        cfg.write_text(f"nbd:\n  tcp: '127.0.0.1:{port}'\n")
        proc, log = start_raw(tmp_path, ["--state-dir", tmp_path / "state", "--config", cfg])
        assert proc.wait(30) == 1
        assert f"127.0.0.1:{port}" in log.read_text()
        assert "in use" in log.read_text()
        assert not (tmp_path / "state" / "control.sock").exists()


def test_sighup_rereads_log_level(tmp_path):
    state = tmp_path / "state"
    cfg = tmp_path / "r.yaml"
    cfg.write_text("log:\n  level: info\n")
    proc, log = start_raw(tmp_path, ["--state-dir", state, "--config", cfg])
    try:
        wait_for(lambda: get_root(str(state / "control.sock")) == 200, what="control socket")
        cfg.write_text("log:\n  level: debug\nio:\n  threads: 1\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP: log level debug (was info)" in log.read_text(), what="reload")
        assert "take effect on restart" in log.read_text()
        cfg.write_text("log:\n  level: [\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "keeping the running configuration" in log.read_text(), what="bad reload")
        assert get_root(str(state / "control.sock")) == 200
    finally:
        assert stop(proc) == 0, log.read_text()


# --- systemd -----------------------------------------------------------------

def test_sd_notify_ready_and_stopping(tmp_path):
    notify_path = str(tmp_path / "notify.sock")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(notify_path)
    ns.settimeout(20)
    state = tmp_path / "state"
    proc, log = start_raw(tmp_path, ["--state-dir", state], env={"NOTIFY_SOCKET": notify_path})
    try:
        msg = ns.recv(4096).decode()
        assert "READY=1" in msg.split("\n"), msg
        assert "STATUS=" in msg
        # READY=1 means ready: the sockets answer right away.
        assert get_root(str(state / "control.sock")) == 200
        assert os.path.exists(state / "nbd.sock")
        proc.send_signal(signal.SIGTERM)
        msg = ns.recv(4096).decode()
        assert "STOPPING=1" in msg.split("\n"), msg
        assert proc.wait(30) == 0, log.read_text()
    finally:
        ns.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_socket_activation(tmp_path):
    require("systemd-socket-activate", "nbdinfo")
    sockdir = tmp_path / "run"
    sockdir.mkdir()
    control = str(sockdir / "control.sock")
    nbd_unix = str(sockdir / "nbd.sock")
    port = free_port()
    state = tmp_path / "state"
    notify_path = str(tmp_path / "notify.sock")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(notify_path)
    ns.settimeout(20)
    env = dict(os.environ)
    env.pop("LISTEN_FDS", None)
    env["NOTIFY_SOCKET"] = notify_path
    log_path = tmp_path / "activate.log"
    with open(log_path, "wb") as log:
        # systemd-socket-activate listens, then execs rpointd (same pid) on the
        # first connection, passing the sockets with these names.
        proc = subprocess.Popen(
            ["systemd-socket-activate", "-l", control, "-l", nbd_unix, "-l", f"127.0.0.1:{port}",
             "--fdname=control:nbd:nbd-tcp", "-E", "NOTIFY_SOCKET",
             RPOINTD, "--state-dir", str(state), "--log-level", "debug"],
            stdout=log, stderr=log, env=env)
    try:
        wait_for(lambda: os.path.exists(control), what="systemd-socket-activate to listen")
        # The first request triggers the exec, and is answered by rpointd.
        assert get_root(control, timeout=20) == 200
        assert "READY=1" in ns.recv(4096).decode()
        text = log_path.read_text()
        assert f"control API listening on unix:{control} (from systemd)" in text, text
        assert f"unix:{nbd_unix} (from systemd)" in text
        assert f"tcp:127.0.0.1:{port} (from systemd)" in text
        # It made no sockets of its own.
        assert not (state / "control.sock").exists()
        assert not (state / "nbd.sock").exists()
        # NBD over both passed sockets.
        conn = UnixHTTPConnection(control)
        conn.request("PUT", "/disks/act", body='{"properties": {"sizeBytes": 1048576}}',
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status in (200, 201), r.read()
        conn.close()
        for uri in (f"nbd+unix:///act?socket={nbd_unix}", f"nbd://127.0.0.1:{port}/act"):
            r = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            assert r.stdout.strip() == "1048576"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()
        assert "STOPPING=1" in ns.recv(4096).decode()
        # Sockets systemd owns are systemd's to remove.
        assert os.path.exists(control)
    finally:
        ns.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_socket_activation_with_unknown_name_and_missing_nbd(tmp_path):
    """Only a 'control' socket is passed: rpointd makes its own NBD socket."""
    require("systemd-socket-activate")
    control = str(tmp_path / "c.sock")
    other = str(tmp_path / "o.sock")
    state = tmp_path / "state"
    log_path = tmp_path / "activate.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["systemd-socket-activate", "-l", control, "-l", other, "--fdname=control:metrics",
             RPOINTD, "--state-dir", str(state)], stdout=log, stderr=log)
    try:
        wait_for(lambda: os.path.exists(other), what="listen")
        assert get_root(control, timeout=20) == 200
        text = log_path.read_text()
        assert "ignoring socket metrics" in text, text
        assert stat.S_ISSOCK(os.stat(state / "nbd.sock").st_mode)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_systemd_analyze_verify(tmp_path):
    """The shipped units pass `systemd-analyze verify`.

    verify insists that ExecStart's binary exists, and needs no running systemd.
    The units are verified from a copy whose ExecStart points at the build (the
    one line changed); the man page referenced by Documentation= is the one
    the build generates from docs/rpointd.8.md, found through MANPATH.
    """
    require("systemd-analyze")
    units = tmp_path / "units"
    units.mkdir()
    for u in UNITS:
        text = open(u).read()
        if u.endswith(".service"):
            assert "ExecStart=/usr/local/sbin/rpointd " in text
            text = text.replace("ExecStart=/usr/local/sbin/rpointd ", f"ExecStart={RPOINTD} ")
        (units / os.path.basename(u)).write_text(text)
    env = dict(os.environ)
    args = ["systemd-analyze", "verify"]
    page = os.path.join(os.path.dirname(RPOINTD), "rpointd.8")
    if os.path.exists(page) and shutil.which("man"):
        # Documentation=man:rpointd(8) must resolve, as it will once installed.
        (tmp_path / "man" / "man8").mkdir(parents=True)
        shutil.copy(page, tmp_path / "man" / "man8" / "rpointd.8")
        env["MANPATH"] = str(tmp_path / "man") + ":"
    else:
        args.append("--man=no")  # the man page is optional in the build (needs go-md2man)
    r = subprocess.run(args + [str(units / os.path.basename(u)) for u in UNITS],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    # Nothing to complain about (verify also prints warnings with rc 0).
    assert "rpointd" not in r.stderr, r.stderr

    service = open(UNITS[0]).read()
    for setting in ("Type=notify", "StateDirectory=rpointd", "ProtectSystem=strict", "NoNewPrivileges=yes",
                    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "LimitMEMLOCK=", "DeviceAllow=block-* rw",
                    "Restart=on-failure", "RestartPreventExitStatus=2", "io_uring_enter"):
        assert setting in service, setting
    assert "PrivateDevices=yes" not in service
    assert "FileDescriptorName=control" in open(UNITS[1]).read()
    assert "FileDescriptorName=nbd" in open(UNITS[2]).read()


def test_units_agree_with_example_config():
    """The sockets systemd makes are where config/rpointd.yaml says they are."""
    r = run("--config", EXAMPLE_CONFIG, "--check-config")
    assert r.returncode == 0, r.stderr
    control = re.search(r"control:\n  socket: (\S+)", r.stdout).group(1)
    nbd = re.search(r"nbd:\n  socket: (\S+)", r.stdout).group(1)
    assert f"ListenStream={control}\n" in open(UNITS[1]).read()
    assert f"ListenStream={nbd}\n" in open(UNITS[2]).read()
    assert "--config /etc/rpointd/rpointd.yaml" in open(UNITS[0]).read()


def _expand_syscall_group(name, seen):
    """Every syscall in a systemd syscall group, groups inside it expanded."""
    if name in seen:
        return set()
    seen.add(name)
    out = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    calls = set()
    for line in out.splitlines()[1:]:
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        calls |= _expand_syscall_group(word, seen) if word.startswith("@") else {word}
    return calls


def test_syscalls_stay_inside_the_units_filter(tmp_path):
    """Every system call rpointd makes (start, API, NBD over Unix and TCP,
    shutdown) is allowed by rpointd.service's SystemCallFilter=: one outside it
    would fail with EPERM only in production, under systemd."""
    require("strace", "systemd-analyze", "nbdcopy", "nbdinfo")
    assert "io_uring_enter" in unit_allowed_syscalls() and "openat" in unit_allowed_syscalls()

    trace = tmp_path / "trace"
    port = free_port()
    state = tmp_path / "state"
    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"nbd:\n  tcp: '127.0.0.1:{port}'\n")
    log_path = tmp_path / "strace.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["strace", "-f", "-qq", "-o", str(trace), RPOINTD, "--state-dir", str(state),
                                 "--config", str(cfg)], stdout=log, stderr=log)
    try:
        wait_for(lambda: get_root(str(state / "control.sock")) == 200, what="rpointd under strace")
        conn = UnixHTTPConnection(str(state / "control.sock"))
        conn.request("PUT", "/disks/sc", body='{"properties": {"sizeBytes": 4194304}}',
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status in (200, 201), r.read()
        conn.close()
        data = tmp_path / "data"
        data.write_bytes(os.urandom(4 << 20))
        subprocess.run(["nbdcopy", str(data), f"nbd+unix:///sc?socket={state}/nbd.sock"], check=True, timeout=60)
        subprocess.run(["nbdcopy", f"nbd://127.0.0.1:{port}/sc", str(tmp_path / "back")], check=True, timeout=60)
        assert (tmp_path / "back").read_bytes() == data.read_bytes()
        # To rpointd itself (its pid is in its lock file), not to strace.
        os.kill(int((state / "rpointd.lock").read_text()), signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_trace_inside_unit_filter(trace)


def unit_allowed_syscalls():
    """The system calls rpointd.service's SystemCallFilter= allows."""
    allowed = set()
    for line in open(UNITS[0]).read().splitlines():
        if line.startswith("SystemCallFilter="):
            for word in line.split("=", 1)[1].split():
                allowed |= _expand_syscall_group(word, set()) if word.startswith("@") else {word}
    return allowed


def assert_trace_inside_unit_filter(trace):
    """Every system call in an `strace -f -qq -o trace` log is one the unit allows."""
    used = set()
    for line in trace.read_text().splitlines():
        m = re.match(r"^\d+\s+(?:<\.\.\. )?([a-z0-9_]+)(?:\(| resumed>)", line)
        if m:
            used.add(m.group(1))
    assert "io_uring_enter" in used, "strace saw no io_uring: the trace is not what this test thinks"
    # execve happens before systemd applies the filter.
    outside = sorted(used - unit_allowed_syscalls() - {"execve"})
    assert not outside, f"system calls outside rpointd.service's SystemCallFilter=: {outside}"


def test_run_script(tmp_path):
    """./run builds (a no-op here: the tests run on a fresh build), says where
    the sockets are and runs rpointd in the foreground; Ctrl-C stops it."""
    build = os.path.dirname(os.path.dirname(RPOINTD))
    env = dict(os.environ, RPOINTD_BUILD_DIR=build)
    env.pop("NOTIFY_SOCKET", None)
    r = subprocess.run([os.path.join(REPO, "run"), "--check-config"], capture_output=True, text=True,
                       timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"state_dir: {REPO}/state\n" in r.stdout   # ./state by default

    state = tmp_path / "state"
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([os.path.join(REPO, "run"), "--state-dir", str(state)], stdout=log, stderr=log,
                                env=env, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: get_root(str(state / "control.sock")) == 200, timeout=600, what="./run")
        text = log_path.read_text()
        assert f"control API  unix:{state}/control.sock" in text, text
        assert f"NBD          unix:{state}/nbd.sock" in text, text
        proc.send_signal(signal.SIGINT)   # ./run exec'd rpointd: same process
        assert proc.wait(30) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
