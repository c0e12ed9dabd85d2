"""Starts a real rpointd and talks to it through its real interfaces.

Used by every integration test (through the fixtures in conftest.py). Nothing is
mocked: the daemon is the built binary, the control API is HTTP over its Unix
socket, data goes through NBD clients.
"""
import http.client
import json
import os
import signal
import socket
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("RPOINTD_BUILD_DIR", os.path.join(REPO, "build"))
RPOINTD = os.path.join(BUILD, "daemon", "rpointd")
RPOINT_CLI = os.path.join(BUILD, "cli", "rpoint")


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=30):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.raw = body
        try:
            self.json = json.loads(body) if body else None
        except ValueError:
            self.json = None

    def __repr__(self):
        return f"<Response {self.status} {self.raw[:300]!r}>"


class Daemon:
    """One rpointd process with its own state directory."""

    def __init__(self, state_dir, extra_args=None, config_text=None, env=None):
        self.state_dir = str(state_dir)
        self.extra_args = list(extra_args or [])
        self.config_text = config_text
        self.env = env
        self.proc = None
        self.log_path = os.path.join(self.state_dir, "rpointd.log")

    @property
    def control_sock(self):
        return os.path.join(self.state_dir, "control.sock")

    @property
    def nbd_sock(self):
        return os.path.join(self.state_dir, "nbd.sock")

    def nbd_uri(self, export):
        return f"nbd+unix:///{export}?socket={self.nbd_sock}"

    def args(self):
        a = [RPOINTD, "--state-dir", self.state_dir, "--log-level", "debug"]
        if self.config_text is not None:
            cfg = os.path.join(self.state_dir, "rpointd.yaml")
            with open(cfg, "w") as f:
                f.write(self.config_text)
            a += ["--config", cfg]
        return a + self.extra_args

    def start(self, timeout=20):
        os.makedirs(self.state_dir, exist_ok=True)
        log = open(self.log_path, "ab")
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env.pop("LISTEN_FDS", None)
        if self.env:
            env.update(self.env)
        self.proc = subprocess.Popen(self.args(), stdout=log, stderr=log, env=env)
        log.close()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rpointd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.api("GET", "/").status == 200 and os.path.exists(self.nbd_sock):
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"rpointd did not become ready:\n{self.log()}")

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-8000:]
        except OSError:
            return ""

    def stop(self, timeout=30):
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError("rpointd did not stop on SIGTERM:\n" + self.log())
        rc = self.proc.returncode
        self.proc = None
        return rc

    def kill9(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def restart(self):
        self.stop()
        return self.start()

    def api(self, method, path, body=None, headers=None, timeout=60):
        conn = UnixHTTPConnection(self.control_sock, timeout=timeout)
        try:
            hdrs = dict(headers or {})
            data = None
            if body is not None:
                data = body if isinstance(body, (bytes, str)) else json.dumps(body)
                hdrs.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=data, headers=hdrs)
            r = conn.getresponse()
            return Response(r.status, dict(r.getheaders()), r.read())
        finally:
            conn.close()

    def create_disk(self, name, size_bytes, **props):
        p = {"sizeBytes": size_bytes}
        p.update(props)
        r = self.api("PUT", f"/disks/{name}", {"properties": p})
        assert r.status in (200, 201), r
        return r.json

    def cli(self, *args, check=True):
        cmd = [RPOINT_CLI, "--socket", self.control_sock] + [str(a) for a in args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if check and r.returncode != 0:
            raise AssertionError(f"{cmd} failed {r.returncode}: {r.stdout}\n{r.stderr}")
        return r
