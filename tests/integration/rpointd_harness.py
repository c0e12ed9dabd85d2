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


def free_tcp_port():
    """A TCP port on 127.0.0.1 that was free a moment ago. Only a moment: until
    a daemon binds it any other socket may take it (another test's pick, a
    client's ephemeral port), so start a daemon on it with start_on_free_port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_on_free_port(daemon, config_for_port, attempts=5):
    """Starts `daemon` with config_text config_for_port(port) on a port from
    free_tcp_port; when the start failed because that port was taken in between
    (the daemon's "... :PORT (port in use)"), again on another. Returns the port."""
    for attempt in range(attempts):
        port = free_tcp_port()
        daemon.config_text = config_for_port(port)
        try:
            daemon.start()
            return port
        except RuntimeError as e:
            if f":{port} (port in use)" not in str(e) or attempt == attempts - 1:
                raise


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
        text = self.config_text or ""
        if "adopt_paths" not in text:
            # Tests adopt files they make next to the state directory (the
            # pytest tmp dir) and loop devices: allow those (the default list
            # names only /dev and system image directories).
            parent = os.path.dirname(os.path.realpath(self.state_dir))
            text += f"\nadopt_paths: [{json.dumps(parent)}, /dev]\n"
        cfg = os.path.join(self.state_dir, "rpointd.yaml")
        with open(cfg, "w") as f:
            f.write(text)
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

    def log_all(self):
        """The whole log (log() keeps only its tail, for messages)."""
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def sighup_and_wait(self, want, timeout=10):
        """SIGHUP the daemon and wait until its log says `want` once more."""
        before = self.log_all().count(want)
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self.log_all().count(want) <= before:
            assert time.monotonic() < deadline, f"no {want!r} after SIGHUP:\n{self.log()}"
            time.sleep(0.02)

    def arm_faults(self, rules, path=None):
        """Writes the fault rules file (RPOINTD_FAULTS_FILE unless `path`) and,
        when the daemon runs, reloads it by SIGHUP; returns once armed."""
        path = path or self.env["RPOINTD_FAULTS_FILE"]
        with open(path + ".tmp", "w") as f:
            f.write(rules + "\n")
        os.rename(path + ".tmp", path)
        if self.proc is not None:
            self.sighup_and_wait("fault injection: rules now " + (rules or "none"))

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

    # ---- restore points (VMs, collections, points, operations) ----

    @property
    def regions_dir(self):
        """Where the default region lives when the config names no regions."""
        return os.path.join(self.state_dir, "regions")

    def region_dir(self, name="local"):
        return os.path.join(self.regions_dir, name)

    def create_vm(self, name, disks, configuration=None, expect=(200, 201)):
        props = {"disks": [{"id": f"/disks/{d}"} for d in disks]}
        if configuration is not None:
            props["configuration"] = configuration
        r = self.api("PUT", f"/vms/{name}", {"properties": props})
        assert r.status in expect, r
        return r.json

    def create_collection(self, name, vm, location=None, expect=(200, 201)):
        body = {"properties": {"source": {"id": f"/vms/{vm}"}}}
        if location is not None:
            body["location"] = location
        r = self.api("PUT", f"/restorePointCollections/{name}", body)
        assert r.status in expect, r
        return r.json

    def start_restore_point(self, collection, name, exclude=(), consistency=None):
        """PUT of a restore point; returns the raw Response (201 + operation headers)."""
        props = {}
        if exclude:
            props["excludeDisks"] = [{"id": f"/disks/{d}"} for d in exclude]
        if consistency is not None:
            props["consistencyMode"] = consistency
        return self.api("PUT", f"/restorePointCollections/{collection}/restorePoints/{name}",
                        {"properties": props})

    def create_restore_point(self, collection, name, exclude=(), consistency=None, wait=True,
                             timeout=300, expect_status="Succeeded"):
        """Creates a point; with wait, polls its operation and returns the point as
        GET ?$expand=instanceView shows it afterwards (asserting expect_status)."""
        r = self.start_restore_point(collection, name, exclude, consistency)
        assert r.status == 201, r
        op = operation_path(r)
        assert r.json["properties"]["provisioningState"] == "Creating", r
        if not wait:
            return r
        done = self.wait_operation(op, timeout=timeout)
        rp = self.get_restore_point(collection, name, expand="instanceView")
        state = rp["properties"]["provisioningState"]
        if expect_status is not None:
            assert state == expect_status, (f"restore point {collection}/{name}: {state}, "
                                            f"operation {done}\n{self.log()[-3000:]}")
        return rp

    def wait_operation(self, op, timeout=300, poll=0.05):
        """Polls /operations/{id} (a path from Azure-AsyncOperation or a bare id)
        until it is no longer InProgress; returns the final operation JSON."""
        path = op if op.startswith("/operations/") else f"/operations/{op}"
        deadline = time.monotonic() + timeout
        while True:
            r = self.api("GET", path)
            assert r.status == 200, r
            if r.json["status"] != "InProgress":
                return r.json
            if time.monotonic() > deadline:
                raise AssertionError(f"operation {path} still InProgress after {timeout} s: "
                                     f"{r.json}\n{self.log()[-3000:]}")
            time.sleep(poll)

    def get_restore_point(self, collection, name, expand=None):
        path = f"/restorePointCollections/{collection}/restorePoints/{name}"
        if expand:
            path += f"?$expand={expand}"
        r = self.api("GET", path)
        assert r.status == 200, r
        return r.json

    def disk_restore_point(self, collection, name, disk):
        r = self.api("GET", f"/restorePointCollections/{collection}/restorePoints/{name}"
                            f"/diskRestorePoints/{disk}")
        assert r.status == 200, r
        return r.json

    def delete_restore_point(self, collection, name):
        r = self.api("DELETE", f"/restorePointCollections/{collection}/restorePoints/{name}")
        assert r.status == 204, r

    def verify_restore_point(self, collection, name, timeout=300):
        """POST .../verify, waits; returns the operation (output in properties.output)."""
        r = self.api("POST", f"/restorePointCollections/{collection}/restorePoints/{name}/verify")
        assert r.status == 202, r
        op = self.wait_operation(operation_path(r), timeout=timeout)
        assert op["status"] == "Succeeded", op
        return op

    def restore_disk(self, disk, collection, rp, source_disk, wait=True, timeout=300):
        """Creates disk `disk` from a disk restore point; returns (response, final op)."""
        src = (f"/restorePointCollections/{collection}/restorePoints/{rp}"
               f"/diskRestorePoints/{source_disk}")
        r = self.api("PUT", f"/disks/{disk}",
                     {"properties": {"creationData": {"createOption": "Restore",
                                                      "sourceResourceId": src}}})
        assert r.status == 201, r
        if not wait:
            return r, None
        op = self.wait_operation(operation_path(r), timeout=timeout)
        assert op["status"] == "Succeeded", op
        return r, op

    def restore_vm(self, collection, rp, vm, disk_names=None, wait=True, timeout=300):
        body = {"vmName": vm}
        if disk_names:
            body["diskNames"] = disk_names
        r = self.api("POST", f"/restorePointCollections/{collection}/restorePoints/{rp}/restore",
                     body)
        assert r.status == 202, r
        if not wait:
            return r, None
        op = self.wait_operation(operation_path(r), timeout=timeout)
        assert op["status"] == "Succeeded", op
        return r, op

    def rp_export(self, collection, rp, disk):
        """The NBD export name of a disk restore point."""
        return f"{collection}/{rp}/{disk}"

    def rp_uri(self, collection, rp, disk):
        return self.nbd_uri(self.rp_export(collection, rp, disk))

    def rss_bytes(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def cli(self, *args, check=True):
        cmd = [RPOINT_CLI, "--socket", self.control_sock] + [str(a) for a in args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if check and r.returncode != 0:
            raise AssertionError(f"{cmd} failed {r.returncode}: {r.stdout}\n{r.stderr}")
        return r


def operation_path(response):
    """The /operations/{id} path of a 201/202 answer; checks the three headers agree."""
    h = {k.lower(): v for k, v in response.headers.items()}
    op = h.get("azure-asyncoperation")
    assert op and op.startswith("/operations/"), f"no Azure-AsyncOperation header: {response.headers}"
    assert h.get("location") == op, f"Location {h.get('location')!r} != {op!r}"
    assert h.get("retry-after") == "1", h.get("retry-after")
    return op


# ---- data helpers shared by the restore point tests ----

def nbd_save(uri, path, timeout=300):
    """Copies an export to a local sparse file with nbdcopy."""
    r = subprocess.run(["nbdcopy", uri, str(path)], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"nbdcopy {uri} {path} failed: {r.stderr}"
    return str(path)


def nbd_write(uri, chunks):
    """Writes [(offset, bytes)] through libnbd, then flushes."""
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    for off, data in chunks:
        h.pwrite(data, off)
    h.flush()
    h.shutdown()


def nbd_digest(uri, step=4 << 20):
    """SHA-256 of a whole export read through libnbd: compare images by
    digest (pytest's diff of two large byte strings takes minutes)."""
    import hashlib

    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    size, hasher = h.get_size(), hashlib.sha256()
    for off in range(0, size, step):
        hasher.update(h.pread(min(step, size - off), off))
    h.shutdown()
    return hasher.hexdigest()


def images_equal(a, b, timeout=300):
    """qemu-img compare of two raw images (files or json: NBD specs);
    returns (equal, message)."""
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode in (0, 1), f"qemu-img compare failed ({r.returncode}): {r.stderr}"
    return r.returncode == 0, (r.stdout + r.stderr).strip()


def tree_bytes(path):
    """Bytes allocated on disk under `path` (st_blocks), 0 if it does not exist."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total
