"""The VM lane: boots Debian's 6.12 cloud kernel under qemu (TCG) with an
initramfs of our own, runs a test script inside, brings back its output and
exit code. Shared by the power-loss test (tests/vm/power-loss) and anything
else that needs a real kernel with nbd, ublk or virtio_blk (issue #11).

    import lane
    lane.ensure_tools()                       # apt: qemu, busybox-static, cpio, backports
    k = lane.Kernel.fetch()                   # newest 6.12 cloud kernel, cached
    k = lane.Kernel.fetch("6.17")             # newest 6.17 (trixie-backports), cached
    ir = lane.Initramfs(workdir)
    ir.add_modules(k, ["virtio_blk", "nbd"])  # + their dependencies, loaded by /init
    ir.add_binary("/usr/bin/nbdinfo")         # -> /tools/nbdinfo + its ldd libraries
    ir.add_text("/test", "#!/bin/sh\\n/tools/nbdinfo --version\\n")
    initrd = ir.build()
    r = lane.run(k, initrd, timeout=120)      # raises LaneError on oops/panic/timeout
    r.rc, r.console

Inside the guest /init mounts proc, sys, devtmpfs (and /tmp as tmpfs), loads the
modules, runs /test with its output on the console, prints
"@@LANE-EXIT <rc>@@" and powers off. Busybox applets shadow PATH, so real
tools live in /tools and are called by absolute path.

Disks are raw images opened with cache=none (host O_DIRECT): the guest's page
cache is the only cache, so VM.kill() (SIGKILL of qemu) is a power cut.

Thread-safety: a VM object is used from one thread (it runs a reader thread of
its own for the console).
"""
import glob
import os
import re
import shutil
import signal
import subprocess
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.environ.get("RPOINTD_VM_CACHE", os.path.join(HERE, "cache"))
EXIT_RE = re.compile(r"@@LANE-EXIT (\d+)@@")
# What a dying kernel prints. Any of these fails the run.
KERNEL_FAULT_RE = re.compile(r"Kernel panic|Oops[:\s]|BUG: |general protection fault|"
                             r"double fault|kernel BUG at|Unable to handle kernel")


class LaneError(Exception):
    """The lane could not run (tool missing, kernel not fetchable) or the guest
    kernel failed (oops, panic, timeout)."""


def ensure_tools():
    """Runs tests/vm/install.sh (idempotent, quiet when all is there)."""
    r = subprocess.run(["bash", os.path.join(HERE, "install.sh")], capture_output=True, text=True)
    if r.returncode != 0:
        raise LaneError(f"tests/vm/install.sh failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    for tool in ("qemu-system-x86_64", "cpio", "xz", "modinfo"):
        if not shutil.which(tool):
            raise LaneError(f"{tool} is missing after install.sh")
    if not os.path.exists("/bin/busybox"):
        raise LaneError("/bin/busybox (busybox-static) is missing after install.sh")


def _sh(cmd, **kw):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, capture_output=True,
                          text=True, **kw).stdout


class Kernel:
    """An extracted linux-image package: vmlinuz and its modules."""

    def __init__(self, root):
        self.root = root
        self.vmlinuz = glob.glob(os.path.join(root, "boot", "vmlinuz-*"))[0]
        # Trixie's packages ship modules under usr/lib (merged /usr), bookworm's under lib.
        self.moddir = (glob.glob(os.path.join(root, "lib", "modules", "*")) +
                       glob.glob(os.path.join(root, "usr", "lib", "modules", "*")))[0]
        self.version = os.path.basename(self.moddir)

    # The kernel series the lane can boot. "6.12" (bookworm-backports, through the
    # machine's own apt sources as install.sh sets them up) is the CI lane; "6.17"
    # (trixie-backports: ublk zero copy, UBLK_F_AUTO_BUF_REG) is for benches and
    # zero-copy runs and is looked up through a private apt configuration under the
    # cache (its own sources file and lists), so the machine's apt sources never
    # see trixie.
    SERIES = {
        "6.12": {"suite": None,
                 "re": r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64-unsigned$"},
        "6.17": {"suite": "trixie-backports",
                 "re": r"^linux-image-6\.17\.[0-9]+\+deb13-cloud-amd64$"},
    }
    DEFAULT_SERIES = "6.12"

    @staticmethod
    def _apt_opts(series, cache):
        """apt options for the series' private configuration ([] for the system's)."""
        suite = Kernel.SERIES[series]["suite"]
        if not suite:
            return []
        d = os.path.join(cache, "apt-" + suite)
        for sub in ("lists/partial", "archives/partial", "parts"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        src = os.path.join(d, "sources.list")
        mirror = _sh("grep -rhs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | "
                     "grep -v -- '-security' | grep '/debian/\\?$' | head -n 1 || true").strip()
        if not mirror:
            mirror = _sh("grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | "
                         "grep -v -- '-security' | grep '/debian/\\?$' | head -n 1 || true").strip()
        if not mirror:
            raise LaneError("no Debian mirror found in /etc/apt")
        with open(src + ".tmp", "w") as f:
            f.write(f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror} "
                    f"{suite} main\n")
        os.rename(src + ".tmp", src)
        return ["-o", f"Dir::Etc::SourceList={src}",
                "-o", f"Dir::Etc::SourceParts={os.path.join(d, 'parts')}",
                "-o", f"Dir::State::Lists={os.path.join(d, 'lists')}",
                "-o", f"Dir::Cache={d}",
                "-o", "Dir::State::status=/dev/null",
                "-o", "APT::Default-Release="]

    @staticmethod
    def newest_package(series=DEFAULT_SERIES, cache=CACHE):
        """The newest cloud kernel of the series that has an install candidate
        today (point releases come and go: never pin one)."""
        if series not in Kernel.SERIES:
            raise LaneError(f"unknown kernel series {series!r} (have {sorted(Kernel.SERIES)})")
        opts = Kernel._apt_opts(series, cache)
        if opts:
            lists = os.path.join(cache, "apt-" + Kernel.SERIES[series]["suite"], "lists")
            fresh = [p for p in glob.glob(os.path.join(lists, "*_Packages*"))
                     if time.time() - os.path.getmtime(p) < 86400]
            if not fresh:
                r = subprocess.run(["apt-get", *opts, "update", "-qq"], capture_output=True,
                                   text=True)
                if r.returncode != 0:
                    raise LaneError(f"apt-get update ({series}) failed:\n{r.stderr}")
        out = _sh(["apt-cache", *opts, "search", "--names-only", Kernel.SERIES[series]["re"]])
        pkgs = [line.split()[0] for line in out.splitlines() if line.strip()]

        def key(p):
            return [int(x) for x in re.findall(r"\d+", p)]

        for p in sorted(pkgs, key=key, reverse=True):
            pol = _sh(["apt-cache", *opts, "policy", p])
            if re.search(r"Candidate: [0-9]", pol):
                return p
        where = Kernel.SERIES[series]["suite"] or "bookworm-backports"
        raise LaneError(f"no {Kernel.SERIES[series]['re']} package has a candidate "
                        f"(is {where} reachable? for 6.12 run tests/vm/install.sh)")

    @classmethod
    def fetch(cls, series=DEFAULT_SERIES, cache=CACHE):
        """The newest kernel of `series` ("6.12": the CI lane; "6.17"), downloaded
        and extracted once into the cache."""
        pkg = cls.newest_package(series, cache)
        root = os.path.join(cache, pkg)
        if not glob.glob(os.path.join(root, "boot", "vmlinuz-*")):
            debs = os.path.join(cache, "debs")
            os.makedirs(debs, exist_ok=True)
            if not glob.glob(os.path.join(debs, pkg + "_*.deb")):
                r = subprocess.run(["apt-get", *cls._apt_opts(series, cache), "download", pkg],
                                   cwd=debs, capture_output=True, text=True)
                if r.returncode != 0:
                    raise LaneError(f"apt-get download {pkg} failed:\n{r.stderr}")
            deb = glob.glob(os.path.join(debs, pkg + "_*.deb"))[0]
            tmp = root + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            _sh(["dpkg-deb", "-x", deb, tmp])
            shutil.rmtree(root, ignore_errors=True)
            os.rename(tmp, root)
        return cls(root)

    def module(self, name):
        """Path of the decompressed .ko of `name` (decompressed once, cached)."""
        hits = [p for p in glob.glob(os.path.join(self.moddir, "kernel", "**", "*.ko*"),
                                     recursive=True)
                if re.sub(r"\.ko(\.xz)?$", "", os.path.basename(p)).replace("-", "_")
                == name.replace("-", "_")]
        if not hits:
            raise LaneError(f"module {name} not in {self.moddir}")
        p = hits[0]
        if p.endswith(".xz"):
            ko = p[:-3]
            if not os.path.exists(ko):
                _sh(["xz", "-dk", p])
            p = ko
        return p

    def modules_with_deps(self, names):
        """The modules and everything they depend on, dependencies first."""
        order = []

        def visit(n):
            n = n.replace("-", "_")
            if n in order:
                return
            ko = self.module(n)
            deps = _sh([shutil.which("modinfo") or "/sbin/modinfo", "-F", "depends", ko]).strip()
            for d in filter(None, deps.split(",")):
                visit(d)
            order.append(n)

        for n in names:
            visit(n)
        return [(n, self.module(n)) for n in order]


INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in $(cat /lib/lane-modules); do
  insmod /lib/lane/$m.ko || echo "lane: insmod $m failed"
done
rc=0
/bin/sh /test || rc=$?
echo "@@LANE-EXIT $rc@@"
sync
poweroff -f
"""


class Initramfs:
    """A gzip'd newc cpio built from a staging directory."""

    def __init__(self, workdir):
        self.dir = os.path.join(workdir, "initramfs")
        shutil.rmtree(self.dir, ignore_errors=True)
        for d in ("bin", "sbin", "proc", "sys", "dev", "tmp", "lib/lane", "tools", "etc"):
            os.makedirs(os.path.join(self.dir, d), exist_ok=True)
        shutil.copy2("/bin/busybox", os.path.join(self.dir, "bin", "busybox"))
        self.modules = []
        self.add_text("/init", INIT, 0o755)
        self.add_text("/etc/passwd", "root:x:0:0:root:/:/bin/sh\n")
        self.add_text("/etc/group", "root:x:0:\n")

    def _dest(self, path):
        return os.path.join(self.dir, path.lstrip("/"))

    def add_text(self, dest, text, mode=0o644):
        p = self._dest(dest)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            f.write(text)
        os.chmod(p, mode)

    def add_file(self, src, dest):
        p = self._dest(dest)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        shutil.copy2(src, p)

    def add_binary(self, src, dest=None):
        """A binary (at /tools/<name> unless dest says) and its ldd libraries at
        the same paths as on the host."""
        self.add_file(src, dest or "/tools/" + os.path.basename(src))
        out = subprocess.run(["ldd", src], capture_output=True, text=True).stdout
        for line in out.splitlines():
            m = re.search(r"(/\S+) \(0x", line)
            if m and os.path.exists(m.group(1)):
                lib = m.group(1)
                if not os.path.exists(self._dest(lib)):
                    self.add_file(os.path.realpath(lib), lib)

    def add_build_binaries(self, build, rels):
        """rpointd's own binaries (paths relative to the meson build dir, e.g.
        "daemon/rpointd") at /tools/<name>; a missing one is a LaneError."""
        for rel in rels:
            p = os.path.join(build, rel)
            if not os.path.exists(p):
                raise LaneError(f"{p} is missing: build first (ninja -C {build})")
            self.add_binary(p)

    def add_modules(self, kernel, names):
        for n, ko in kernel.modules_with_deps(names):
            if n not in self.modules:
                self.add_file(ko, f"/lib/lane/{n}.ko")
                self.modules.append(n)
        self.add_text("/lib/lane-modules", "\n".join(self.modules) + "\n")

    def build(self, out=None):
        out = out or self.dir + ".cpio.gz"
        with open(out, "wb") as f:
            find = subprocess.Popen("find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -1",
                                    shell=True, cwd=self.dir, stdout=f)
            if find.wait() != 0:
                raise LaneError("building the initramfs failed")
        return out


def overlay(base, files, out):
    """base initramfs + an uncompressed cpio of `files` ({guest path: bytes});
    the kernel unpacks concatenated archives in order, later ones win."""
    stage = out + ".d"
    shutil.rmtree(stage, ignore_errors=True)
    for path, data in files.items():
        p = os.path.join(stage, path.lstrip("/"))
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    names = subprocess.run("find . -mindepth 1 | LC_ALL=C sort", shell=True, cwd=stage,
                           capture_output=True, check=True).stdout
    extra = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=stage, input=names,
                           capture_output=True, check=True).stdout
    shutil.rmtree(stage)
    with open(base, "rb") as f:
        head = f.read()
    with open(out, "wb") as f:
        f.write(head)
        # The kernel looks for the next archive at a 4-byte boundary (zeroes skipped).
        f.write(bytes(-len(head) % 4))
        f.write(extra)
    return out


class VM:
    """One qemu process. disks: raw image paths (virtio, cache=none, /dev/vda...).
    serial_files: host files that receive the guest's /dev/ttyS1, ttyS2, ...

    tsc=unstable: under a busy host the TSC watchdog marks the TSC unstable at
    run time, which flips the sched_clock static key with -smp 2 running; that
    live code patching oopsed (int3 in sched_clock_cpu) under TCG. Unstable
    from boot, the key never flips later."""

    def __init__(self, kernel, initrd, disks=(), serial_files=(), append="", mem=2048, smp=2,
                 console_log=None):
        self.args = ["qemu-system-x86_64", "-cpu", "max,-cx16", "-smp", str(smp), "-m", str(mem),
                     "-nographic", "-no-reboot", "-serial", "mon:stdio",
                     "-kernel", kernel.vmlinuz, "-initrd", initrd,
                     "-append", f"console=ttyS0 quiet panic=-1 tsc=unstable {append}".strip()]
        for s in serial_files:
            self.args += ["-serial", f"file:{s}"]
        for img in disks:
            self.args += ["-drive", f"file={img},format=raw,if=virtio,cache=none"]
        self.console_log = console_log
        self.proc = None
        self._buf = []
        self._lock = threading.Lock()
        self._reader = None
        self.started = None

    def start(self):
        if not shutil.which("qemu-system-x86_64"):
            raise LaneError("qemu-system-x86_64 is missing (tests/vm/install.sh)")
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.monotonic()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self):
        log = open(self.console_log, "ab") if self.console_log else None
        for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):
            with self._lock:
                self._buf.append(chunk.decode(errors="replace"))
            if log:
                log.write(chunk)
                log.flush()
        if log:
            log.close()

    @property
    def console(self):
        with self._lock:
            return "".join(self._buf).replace("\r", "")

    def check_kernel(self):
        m = KERNEL_FAULT_RE.search(self.console)
        if m:
            tail = self.console[max(0, m.start() - 2000):m.start() + 3000]
            raise LaneError(f"guest kernel failed ({m.group(0)!r}):\n{tail}")

    def wait(self, predicate, timeout, what="the guest"):
        """Polls predicate() every 10 ms until true; raises on a kernel fault,
        on qemu exiting first, or after timeout seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return
            self.check_kernel()
            if self.proc.poll() is not None:
                self._reader.join(5)
                if predicate():
                    return
                self.check_kernel()
                raise LaneError(f"qemu exited ({self.proc.returncode}) while waiting for {what}:"
                                f"\n{self.console[-4000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise LaneError(f"timeout ({timeout} s) waiting for {what}:\n"
                                f"{self.console[-4000:]}")
            time.sleep(0.01)

    def wait_exit(self, timeout):
        """Waits for /test to end; returns its exit code."""
        self.wait(lambda: EXIT_RE.search(self.console), timeout, "the test to end")
        rc = int(EXIT_RE.search(self.console).group(1))
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
            raise LaneError("qemu did not power off after the test ended")
        self._reader.join(5)
        self.check_kernel()
        return rc

    def kill(self):
        """SIGKILL: a power cut."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self._reader:
            self._reader.join(5)


class Result:
    def __init__(self, rc, console):
        self.rc, self.console = rc, console


def run(kernel, initrd, timeout=300, **vm_args):
    """Boots, waits for /test to end, returns Result(rc, console)."""
    vm = VM(kernel, initrd, **vm_args).start()
    try:
        rc = vm.wait_exit(timeout)
    finally:
        vm.kill()
    return Result(rc, vm.console)
