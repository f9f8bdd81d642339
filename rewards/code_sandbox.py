"""Running untrusted code: one Python program per call, in a bubblewrap sandbox, killed on time.

``run_untrusted(source)`` starts a *launcher* (the first half of this file, run by the same
interpreter with ``-I -S -c``). The launcher starts ``bwrap`` (bubblewrap, see docs/sandbox.md),
which builds the sandbox and runs a small *init* (pid 1 inside) that forks the program. Layers
(``SandboxResult.isolation`` names those that were active; the kernel ones are checked from inside
the sandbox, not assumed):

userns   A new user namespace (also for root: see ``uid``). The program runs as uid/gid 1000
         with no capabilities (``nocaps``), ``no_new_privs``, and cannot create further user
         namespaces (``--disable-userns``). ``RLIMIT_NPROC`` counts processes per user namespace,
         so it bounds this sandbox only (fork bombs), for root and non-root callers alike.
pidns    A new pid namespace: the program sees only the sandbox's processes and cannot name, let
         alone signal, a host process. When init exits, the kernel kills everything left.
ipcns    A new IPC namespace: SysV IPC and POSIX queues are private and die with the sandbox.
utsns    A new UTS namespace: hostname ``sandbox``.
netns    A new network namespace: only its own loopback, so no connection reaches the host or
         the network, and the host's abstract Unix sockets are out of reach.
cgroupns A new cgroup namespace (the program sees its cgroup as ``/``).
mntns    A new mount namespace with a minimal view: the interpreter binary, its stdlib and
         libpython, the dynamic loader and the system library dirs (``/usr/lib/<multiarch>``,
         ``/usr/lib64``), all bound read-only; a fresh ``/proc``, a minimal ``/dev``, fresh tmpfs
         ``/tmp`` and ``/dev/shm`` (``file_size_mb`` each). No ``/etc``, ``/home``, ``/root``, no
         repository, no test file, no other host path. The program arrives as ``/tmp/main.py``
         (copied by bwrap from an unlinked file); the working directory, ``HOME`` and ``TMPDIR``
         are ``/tmp``.
rofs     Every mount but ``/tmp``, ``/dev/shm``, ``/proc`` and ``/dev/pts`` is read-only (the new
         root and ``/dev`` are remounted read-only; binds are read-only recursively).
seccomp  A classic-BPF filter (built below with ``struct``, x86_64 and aarch64; other arches or
         ABIs are killed): ``socket``/``socketpair`` of ``AF_UNIX``, ``io_uring_*`` (a way around
         the socket rule), ``memfd_create``, ``shmget``, ``msgget`` (memory that the memory watch
         below cannot see), ``ptrace`` and ``process_vm_*`` (tampering with init), ``bpf``,
         ``perf_event_open``, ``userfaultfd`` and the key syscalls fail with ``EPERM``.
uid      Root callers only: bwrap itself runs as a fresh random uid (10M..20M, no account, no
         groups), so even an escape from the namespaces lands in an unprivileged, unique uid.
         Non-root callers: the sandbox runs as the caller's uid on the host (inside: uid 1000).
memwatch The launcher sums ``RssAnon + RssShmem`` of all sandbox processes every 20 ms and kills
         the sandbox above ``memory_mb``: a bound per sandbox, not per process. (Used instead of a
         cgroup, which root-only or delegated setups would need; see docs/sandbox.md.)
audit    An audit hook (``sys.addaudithook``) denies non-``AF_UNIX`` sockets, DNS, ``os.killpg``
         and ``os.kill`` of anything but the program and its children. Defence in depth only.
rlimits  Per process: ``RLIMIT_CPU`` (soft ``cpu_s``), ``RLIMIT_AS`` (``memory_mb``),
         ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE`` 256, ``RLIMIT_CORE`` 0; per sandbox ``RLIMIT_NPROC``.

The environment is empty except ``PATH``, ``LANG``, ``HOME`` and ``TMPDIR``, so no secret of the
caller reaches the program. The interpreter runs with ``-I -S``: stdlib only.

Lifetime: the launcher has ``PR_SET_PDEATHSIG`` = SIGKILL (and checks that its caller is still
there), bwrap ``--die-with-parent``, init is pid 1 of the pid namespace: if the caller dies, the
launcher, bwrap and every sandbox process die with it. The launcher itself enforces the wall
limit and the memory bound, and it is out of the program's reach (another pid namespace). When
the program exits, init exits and the kernel kills what is left; the launcher (a child subreaper)
reaps until nothing is left, then reports (init's word on the exit status counts only if it
agrees with init's exit code, which bwrap passes on and the program cannot forge). If the
launcher does not finish within ``_GRACE_S``
after the wall limit, the caller SIGKILLs its process group (and so, by the chain, the sandbox).
Without bubblewrap, or without user namespaces, ``run_untrusted`` raises ``SandboxUnavailable``
(a one-line error saying what to install or enable) rather than run code unconfined.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import time

_CLONE_NEWNS = 0x20000
_MS_BIND, _MS_REC, _MS_PRIVATE, _MS_NOSUID, _MS_NODEV = 4096, 16384, 1 << 18, 2, 4
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36
_BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
_WATCH_S = 0.02  # memory watch period
_NS = ("user", "pid", "ipc", "uts", "net", "cgroup", "mnt")
_WRITABLE = ("/tmp", "/dev/shm", "/proc", "/dev/pts")  # the only mounts that may be read-write

# Runs first in the sandbox as pid 1 (init): reports what isolation it finds, forks the program,
# waits for it and reports its exact wait status. In the child: limits, audit hook, main.py.
_BOOT = r"""
import os, sys, signal
def _rlpost_audit(event, args, _getpid=os.getpid, _getattr=getattr, _deny=PermissionError):
    if event.startswith("socket."):
        if event == "socket.gethostname":
            return
        if event == "socket.__new__" and args[1] == 1:
            return
        if event in ("socket.bind", "socket.connect", "socket.sendto", "socket.sendmsg") \
                and _getattr(args[0], "family", None) == 1:
            return
        raise _deny("rlpost sandbox: network access is blocked (%s)" % event)
    if event == "os.killpg" or (event == "os.kill" and not _rlpost_own(args[0], _getpid())):
        raise _deny("rlpost sandbox: signalling other processes is blocked")
def _rlpost_own(pid, me, _open=open, _int=int, _errors=(OSError, ValueError, IndexError)):
    if pid == me:
        return True
    try:
        with _open("/proc/%d/stat" % pid, "rb") as f:
            return pid > 0 and _int(f.read().rsplit(b")", 1)[1].split()[1]) == me
    except _errors:
        return False
def _rlpost_code(status):
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
def _rlpost_report():
    ns = " ".join(os.readlink("/proc/self/ns/" + n) for n in __NS__)
    with open("/proc/self/status") as f:
        st = dict(ln.split(":", 1) for ln in f.read().splitlines() if ":" in ln)
    rw = []
    with open("/proc/self/mountinfo") as f:
        for ln in f:
            fields = ln.split()
            if "rw" in fields[5].split(",") and fields[4] not in __WRITABLE__:
                try:
                    if os.path.isdir(fields[4]):
                        rw.append(fields[4])
                except OSError:
                    rw.append(fields[4])
    return "started %s seccomp=%s capeff=%s rofs=%d\n" % (
        ns, st["Seccomp"].strip(), st["CapEff"].strip(), not rw)
_fd, _cpu, _mem, _fsize, _nproc = map(int, sys.argv[1:6])
sys.argv = sys.argv[6:]
signal.signal(signal.SIGINT, signal.SIG_DFL)  # init ignores every signal it has no handler for
os.environ.pop("PWD", None)  # bwrap sets it after --chdir
os.write(_fd, _rlpost_report().encode())
_child = os.fork()
if _child:
    while True:
        _pid, _status = os.waitpid(-1, 0)
        if _pid == _child:  # the exit code (which bwrap passes on) vouches for the line
            os.write(_fd, b"exit %d\n" % _status)
            os._exit(_rlpost_code(_status))
os.close(_fd)
import resource
_mb = 1024 * 1024
for _res, _val in ((resource.RLIMIT_CPU, (_cpu, _cpu + 1)),
                   (resource.RLIMIT_AS, (_mem * _mb,) * 2),
                   (resource.RLIMIT_FSIZE, (_fsize * _mb,) * 2),
                   (resource.RLIMIT_NPROC, (_nproc, _nproc)),
                   (resource.RLIMIT_NOFILE, (256, 256)), (resource.RLIMIT_CORE, (0, 0))):
    resource.setrlimit(_res, _val)
signal.signal(signal.SIGINT, signal.default_int_handler)
del _fd, _cpu, _mem, _fsize, _nproc, _child, _mb, _res, _val, resource
sys.addaudithook(_rlpost_audit)
_m = type(sys)("__main__")
_m.__file__ = sys.argv[0]
sys.modules["__main__"] = _m
with open(sys.argv[0], "rb") as _f:
    _code = compile(_f.read(), sys.argv[0], "exec")
del _f, _m
exec(_code, sys.modules["__main__"].__dict__)
""".replace("__NS__", repr(_NS)).replace("__WRITABLE__", repr(_WRITABLE))


# ----------------------------------------------------------------------------- launcher side
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    enc = (lambda s: None if s is None else s.encode())
    _check(_libc().mount(enc(src), enc(target), enc(fstype), flags, enc(data or None)),
           f"mount {target}")


def _hidden_ancestor(path: str) -> str | None:
    """The highest ancestor of ``path`` that other users cannot traverse (e.g. /root), if any."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        anc = "/" + "/".join(parts[:i])
        if not os.stat(anc).st_mode & 0o001:
            return anc
    return None


def _expose_hidden(bwrap_argv: list[str]) -> None:
    """Root only, before dropping to the sandbox uid: bind sources under a dir that uid cannot
    traverse (a pyenv interpreter in /root) are made reachable in a private mount namespace of
    the launcher: a tmpfs covers that dir and each source is bound back at its own path."""
    sources = [bwrap_argv[i + 1] for i, a in enumerate(bwrap_argv) if a == "--ro-bind"]
    hidden = {src: _hidden_ancestor(src) for src in sources}
    hidden = {src: anc for src, anc in hidden.items() if anc is not None}
    if not hidden:
        return
    _check(_libc().unshare(_CLONE_NEWNS), "unshare")
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    fds = {src: os.open(src, os.O_PATH) for src in hidden}  # in the new namespace: bindable
    for anc in sorted(set(hidden.values())):
        _mount("tmpfs", anc, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")
    for src, fd in fds.items():
        os.makedirs(os.path.dirname(src), mode=0o755, exist_ok=True)
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(src, mode=0o755, exist_ok=True)
        else:
            os.close(os.open(src, os.O_CREAT | os.O_WRONLY, 0o644))
        _mount(f"/proc/self/fd/{fd}", src, None, _MS_BIND | _MS_REC)
        os.close(fd)


def _tree(root: int) -> list[int]:
    """``root`` and all its descendants (children of every thread), parents first."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        found.append(pid)
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                    todo += [int(c) for c in f.read().split()]
            except OSError:
                continue
    return found


def _rss_bytes(pids: list[int]) -> int:
    """Anonymous plus shared-memory resident bytes of ``pids`` (file-backed pages excluded)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                data = f.read()
        except OSError:
            continue
        for line in data.split(b"\n"):
            if line.startswith((b"RssAnon:", b"RssShmem:")):
                total += int(line.split()[1]) * 1024
    return total


def _reap_all(bwrap: int) -> int:
    """Wait until the launcher has no child left (orphans come back to it: child subreaper);
    returns bwrap's exit code."""
    code = -1
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return code
        if pid == bwrap:
            code = os.waitstatus_to_exitcode(status)


def _exit_line(lines: list[str], code: int) -> str:
    """Init's ``exit <wait status>`` line that agrees with init's exit code (passed on by bwrap):
    the program runs as init's uid and could write lines of its own into init's pipe."""
    for line in reversed(lines):
        if line.startswith("exit ") and line[5:].isdigit():
            status = int(line[5:])
            if (os.WEXITSTATUS(status) if os.WIFEXITED(status)
                    else 128 + os.WTERMSIG(status)) == code:
                return line
    return f"exit {code << 8 if 0 <= code < 128 else code - 128}"  # as bwrap saw it


def _start_bwrap(cfg: dict, argv: list[str], ctl: int) -> int:
    """Fork and exec bwrap (as the sandbox uid when root); returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    try:
        os.chdir("/")
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
        _check(_libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")  # after setuid
        if os.getppid() != cfg["launcher"]:
            os._exit(137)
        os.execve(argv[0], argv, _BASE_ENV)
    except BaseException as e:  # noqa: BLE001 - report anything, then die without unwinding
        os.write(ctl, f"error starting bubblewrap: {type(e).__name__}: {e}\n".encode())
    os._exit(127)


def _layers(cfg: dict, started: str) -> list[str]:
    """Isolation layers, from init's own report (``started ...``) compared with the launcher."""
    words = started.split()[1:]
    inside, flags = words[:len(_NS)], dict(w.split("=", 1) for w in words[len(_NS):])
    layers = [f"{name}ns" for name, ns in zip(_NS, inside)
              if ns != os.readlink(f"/proc/self/ns/{name}")]
    if flags.get("rofs") == "1" and "mntns" in layers:
        layers.append("rofs")
    if flags.get("seccomp") == "2":
        layers.append("seccomp")
    if flags.get("capeff") and int(flags["capeff"], 16) == 0:
        layers.append("nocaps")
    if cfg["uid"] is not None:
        layers.append("uid")
    return layers + ["memwatch", "audit", "rlimits"]


def _supervise(cfg: dict, pid: int, status_r: int) -> tuple[str, bytes, int]:
    """Wait for bwrap to end, enforcing the wall limit and the memory bound; returns the
    verdict (``done``, ``timeout`` or ``memory <bytes>``), what init reported, bwrap's exit
    code."""
    deadline = cfg["start"] + cfg["timeout_s"]
    limit = cfg["memory_mb"] * 1024 * 1024
    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(status_r, select.POLLIN)
    report, verdict, next_watch = b"", "", time.monotonic()
    while not verdict:
        now = time.monotonic()
        if now >= deadline:
            verdict = "timeout"
            break
        if now >= next_watch:
            used = _rss_bytes(_tree(pid))
            if used > limit:
                verdict = f"memory {used}"
                break
            next_watch = now + _WATCH_S
        for fd, _ in poller.poll(max(0.0, min(deadline, next_watch) - now) * 1000):
            if fd == pidfd:
                verdict = "done"
            else:
                chunk = os.read(status_r, 4096)
                report += chunk
                if not chunk:
                    poller.unregister(status_r)
    if verdict != "done":
        for victim in _tree(pid)[1:] + [pid]:  # init first: the kernel then kills the rest
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
    code = _reap_all(pid)
    os.close(pidfd)
    while chunk := os.read(status_r, 4096):  # every writer is gone: reads until EOF
        report += chunk
    return verdict, report, code


def _launch(cfg: dict, bwrap_argv: list[str]) -> None:
    """Launcher entry point: die with the caller, start bwrap, supervise, report on ``ctl``."""
    ctl, status_r = cfg["ctl"], cfg["status_r"]
    libc = _libc()
    _check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
    if os.getppid() != cfg["parent"]:
        return  # the caller died before the line above took effect
    _check(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl")
    for fd in (ctl, status_r):
        os.set_inheritable(fd, False)
    try:
        if cfg["uid"] is not None:
            _expose_hidden(bwrap_argv)
    except OSError as e:
        os.write(ctl, f"error sandbox setup failed: {e}\n".encode())
        return
    cfg["launcher"] = os.getpid()
    pid = _start_bwrap(cfg, bwrap_argv, ctl)
    os.close(cfg["status_w"])
    verdict, report, code = _supervise(cfg, pid, status_r)
    lines = report.decode(errors="replace").splitlines()
    started = next((ln for ln in lines if ln.startswith("started ")), None)
    if started is not None:
        os.write(ctl, f"layers {','.join(_layers(cfg, started))}\n".encode())
    if verdict != "done":
        os.write(ctl, f"{verdict}\n".encode())
    elif started is None:  # bwrap ended by itself before init ran: it could not build it
        os.write(ctl, b"unstarted\n")
    else:
        os.write(ctl, f"{_exit_line(lines, code)}\n".encode())


def _parse_args(argv: list[str]) -> tuple[dict, list[str]]:
    """``key=value`` arguments from the host, then ``--`` and the bwrap command line."""
    cut = argv.index("--")
    cfg: dict = dict(a.split("=", 1) for a in argv[:cut])
    for key in ("parent", "ctl", "status_r", "status_w", "memory_mb"):
        cfg[key] = int(cfg[key])
    cfg["timeout_s"] = float(cfg["timeout_s"])
    cfg["uid"] = int(cfg["uid"]) if cfg["uid"] else None
    cfg["start"] = time.monotonic()
    return cfg, argv[cut + 1:]


if __name__ == "__main__":
    _launch(*_parse_args(sys.argv[1:]))
    os._exit(0)  # everything went through os.write: skip the interpreter's shutdown

# ----------------------------------------------------------------------------- host side
# Imported here, not at the top, so that the launcher (this file run as a script) starts fast.
import errno  # noqa: E402
import functools  # noqa: E402
import secrets  # noqa: E402
import selectors  # noqa: E402
import shutil  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Literal  # noqa: E402

from rewards.errors import UserError  # noqa: E402

Status = Literal["ok", "failed", "timeout", "killed", "error"]
OUTPUT_LIMIT_BYTES = 64 * 1024
_GRACE_S = 2.0  # after the wall limit: time the launcher gets to kill and reap before its group is
_SANDBOX_UID = 1000  # the program's uid and gid inside the user namespace
_INSTALL_HINT = ("install it with `apt-get install -y bubblewrap` (scripts/setup.sh does this when "
                 "run as root)")
_USERNS_KNOBS = ("/proc/sys/user/max_user_namespaces", "/proc/sys/kernel/unprivileged_userns_clone")
_USERNS_HINT = ("enable unprivileged user namespaces (sysctl -w user.max_user_namespaces=10000; "
                "Debian: kernel.unprivileged_userns_clone=1; Ubuntu: "
                "kernel.apparmor_restrict_unprivileged_userns=0)")


class SandboxUnavailable(UserError):
    """The sandbox cannot run here (bubblewrap missing, user namespaces off); the message says
    what to install or enable. Raised instead of running code without isolation."""


@dataclass(frozen=True)
class SandboxResult:
    """How one untrusted run ended.

    status      ``ok`` exit code 0; ``failed`` exit code != 0 (e.g. an uncaught exception,
                MemoryError under RLIMIT_AS); ``timeout`` the wall limit was hit and everything
                was killed; ``killed`` ended by a signal (RLIMIT_CPU, a segfault, the memory
                bound of the sandbox: stderr then says so); ``error`` the sandbox itself could
                not start the program (stderr says why).
    returncode  exit code, ``-signal`` when killed, ``None`` for timeout / error.
    stdout, stderr  decoded (UTF-8, invalid bytes replaced), each cut at the output limit with
                a note saying how many bytes were dropped.
    wall_s      seconds from start to the end of the sweep.
    isolation   the layers that were active (module docstring): userns, pidns, ipcns, utsns,
                netns, cgroupns, mntns, rofs, seccomp, nocaps, uid (root callers), memwatch,
                audit, rlimits.
    """

    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    isolation: tuple[str, ...] = ()


class _Capture:
    """Keeps the first ``limit`` bytes of a stream and counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit, self.data, self.dropped = limit, bytearray(), 0

    def add(self, chunk: bytes) -> None:
        room = max(0, self.limit - len(self.data))
        self.data += chunk[:room]
        self.dropped += len(chunk) - min(room, len(chunk))

    def text(self) -> str:
        text = self.data.decode("utf-8", errors="replace")
        if self.dropped:
            text += f"\n[rlpost sandbox: output truncated, {self.dropped} more bytes dropped]"
        return text


def run_untrusted(source: str, *, timeout_s: float = 5.0, cpu_s: int = 5, memory_mb: int = 512,
                  file_size_mb: int = 16, max_processes: int = 32, stdin: str = "",
                  output_limit: int = OUTPUT_LIMIT_BYTES) -> SandboxResult:
    """Run Python ``source`` in the sandbox and return how it ended (never raises for the program).

    ``timeout_s`` is the wall-clock limit for the whole run; ``cpu_s`` (per process),
    ``memory_mb`` (address space of each process, and resident memory of all of them together),
    ``file_size_mb`` (largest file, and size of each private tmpfs) and ``max_processes`` (all
    processes of the run together) are kernel-enforced limits. ``stdin`` is fed from an
    unlinked file. Raises ``SandboxUnavailable`` when the sandbox cannot be built here.
    """
    if timeout_s <= 0 or min(cpu_s, memory_mb, file_size_mb, max_processes, output_limit) < 1:
        raise ValueError("run_untrusted: timeout_s and every limit must be positive")
    bwrap = _bwrap_path()
    with tempfile.TemporaryFile() as src, tempfile.TemporaryFile() as fin:
        src.write(source.encode("utf-8"))
        fin.write(stdin.encode("utf-8"))
        src.seek(0)
        fin.seek(0)
        return _run_launcher(bwrap, src.fileno(), fin, timeout_s, cpu_s, memory_mb, file_size_mb,
                             max_processes, output_limit)


@functools.lru_cache(maxsize=None)
def _bwrap_path() -> str:
    """bwrap's path, once the host is known to allow what it needs (else SandboxUnavailable)."""
    path = shutil.which("bwrap", path=os.environ.get("PATH", "") + ":/usr/bin:/bin")
    if path is None:
        raise SandboxUnavailable(f"rlpost sandbox: bubblewrap (bwrap) is not installed; "
                                 f"{_INSTALL_HINT}")
    for knob in _USERNS_KNOBS:
        try:
            with open(knob) as f:
                off = f.read().strip() == "0"
        except OSError:
            continue
        if off:
            name = knob.rpartition("/proc/sys/")[2].replace("/", ".")
            raise SandboxUnavailable(f"rlpost sandbox: {name} is 0, so bubblewrap cannot create "
                                     f"a user namespace; {_USERNS_HINT}")
    return os.path.realpath(path)


@functools.lru_cache(maxsize=None)
def _launcher_source() -> str:
    """The launcher half of this file (everything above the host side), run with ``-c``: the
    launcher then compiles half the code it would as a script."""
    with open(__file__, encoding="utf-8") as f:
        text = f.read()
    return text[:text.index("\n# " + "-" * 77 + " host side\n")]


def _elf_interpreter(exe: str) -> str | None:
    """The PT_INTERP path (dynamic loader) of a 64-bit little-endian ELF file, if any."""
    try:
        with open(exe, "rb") as f:
            head = f.read(64)
            if head[:6] != b"\x7fELF\x02\x01":
                return None
            phoff, = struct.unpack_from("<Q", head, 32)
            phentsize, phnum = struct.unpack_from("<HH", head, 54)
            for i in range(phnum):
                f.seek(phoff + i * phentsize)
                ptype, _, offset, _, _, size = struct.unpack("<IIQQQQ", f.read(40))
                if ptype == 3:
                    f.seek(offset)
                    return f.read(size).rstrip(b"\0").decode()
    except (OSError, struct.error, UnicodeDecodeError):
        return None
    return None


def _resolve(path: str, links: dict[str, str], depth: int = 0) -> str:
    """The real path of ``path``; records in ``links`` each symlink met on the way."""
    parts = path.strip("/").split("/")
    cur = ""
    for i, part in enumerate(parts):
        nxt = f"{cur}/{part}"
        if depth < 40 and os.path.islink(nxt):
            target = os.readlink(nxt)
            links[nxt] = target
            base = os.path.normpath(os.path.join(os.path.dirname(nxt), target))
            rest = "/".join(parts[i + 1:])
            return _resolve(f"{base}/{rest}" if rest else base, links, depth + 1)
        cur = nxt
    return cur or "/"


@functools.lru_cache(maxsize=None)
def _view() -> tuple[str, tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(interpreter, read-only binds, symlinks) of the sandbox's file system view."""
    import sysconfig  # noqa: PLC0415 - only here, once per process

    exe = os.path.realpath(sys.executable)
    base = {"base": sys.base_prefix, "installed_base": sys.base_prefix,  # not a venv's prefix
            "platbase": sys.base_exec_prefix, "installed_platbase": sys.base_exec_prefix}
    paths = sysconfig.get_paths(vars=base)
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{os.uname().machine}-linux-gnu"
    wanted = [exe, paths["stdlib"], paths["platstdlib"], sysconfig.get_config_var("DESTSHARED"),
              os.path.join(sysconfig.get_config_var("LIBDIR") or "/nonexistent",
                           sysconfig.get_config_var("INSTSONAME") or "-"),
              _elf_interpreter(exe), f"/lib/{multiarch}", f"/usr/lib/{multiarch}", "/lib64",
              "/usr/lib64"]
    links: dict[str, str] = {}
    real = {_resolve(p, links) for p in wanted if p and os.path.exists(p)}
    binds: list[str] = []
    for path in sorted(real):
        if not any(path.startswith(b + "/") for b in binds):
            binds.append(path)
    inside = (lambda p: any(p == b or p.startswith(b + "/") for b in binds))
    kept = tuple(sorted((t, p) for p, t in links.items() if not inside(p)))
    return exe, tuple(binds), kept


# Classic BPF for seccomp (struct sock_filter: u16 code, u8 jt, u8 jf, u32 k).
_LD_ABS, _JEQ, _JGE, _RET = 0x20, 0x15, 0x35, 0x06
_ALLOW, _ERRNO, _KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
_ARCHES = {  # audit arch, AF_UNIX-checked calls (socket, socketpair), calls that get EPERM
    "x86_64": (0xC000003E, (41, 53), (425, 426, 427, 319, 29, 68, 101, 310, 311, 321, 298, 323,
                                      250, 248, 249)),
    "aarch64": (0xC00000B7, (198, 199), (425, 426, 427, 279, 194, 186, 117, 270, 271, 280, 241,
                                         282, 219, 217, 218)),
}  # EPERM: io_uring_setup/enter/register, memfd_create, shmget, msgget, ptrace,
#    process_vm_readv/writev, bpf, perf_event_open, userfaultfd, keyctl, add_key, request_key


@functools.lru_cache(maxsize=None)
def _seccomp_program(machine: str) -> bytes | None:
    """The filter for ``machine`` (None where it is not supported): wrong arch -> kill;
    x32 ABI -> ENOSYS; the listed calls -> EPERM; socket/socketpair(AF_UNIX) -> EPERM."""
    if machine not in _ARCHES:
        return None
    arch, (sock, pair), denied = _ARCHES[machine]
    ins = (lambda code, k, jt=0, jf=0: struct.pack("=HBBI", code, jt, jf, k))
    prog = [ins(_LD_ABS, 4), ins(_JEQ, arch, 1, 0), ins(_RET, _KILL_PROCESS), ins(_LD_ABS, 0)]
    if machine == "x86_64":
        prog += [ins(_JGE, 0x40000000, 0, 1), ins(_RET, _ERRNO | errno.ENOSYS)]
    for nr in denied:
        prog += [ins(_JEQ, nr, 0, 1), ins(_RET, _ERRNO | errno.EPERM)]
    prog += [ins(_JEQ, sock, 1, 0), ins(_JEQ, pair, 0, 3), ins(_LD_ABS, 16),  # args[0], low half
             ins(_JEQ, 1, 0, 1), ins(_RET, _ERRNO | errno.EPERM), ins(_RET, _ALLOW)]
    return b"".join(prog)


def _bwrap_argv(bwrap: str, src_fd: int, seccomp_fd: int | None, status_w: int, cpu_s: int,
                memory_mb: int, file_size_mb: int, max_processes: int) -> list[str]:
    exe, binds, links = _view()
    size = str(file_size_mb * 1024 * 1024)
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
            "--new-session", "--as-pid-1", "--cap-drop", "ALL", "--uid", str(_SANDBOX_UID),
            "--gid", str(_SANDBOX_UID), "--hostname", "sandbox", "--clearenv"]
    for key, value in dict(_BASE_ENV, HOME="/tmp", TMPDIR="/tmp").items():
        argv += ["--setenv", key, value]
    for path in binds:
        argv += ["--ro-bind", path, path]
    for target, path in links:
        argv += ["--symlink", target, path]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", size, "--tmpfs", "/dev/shm",
             "--remount-ro", "/dev", "--size", size, "--tmpfs", "/tmp",
             "--file", str(src_fd), "/tmp/main.py", "--remount-ro", "/", "--chdir", "/tmp"]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    # init counts against RLIMIT_NPROC too: max_processes is the program and its descendants.
    return argv + ["--", exe, "-I", "-S", "-c", _BOOT, str(status_w), str(cpu_s),
                   str(memory_mb), str(file_size_mb), str(max_processes + 1), "main.py"]


def _run_launcher(bwrap: str, src_fd: int, fin, timeout_s: float, cpu_s: int, memory_mb: int,
                  file_size_mb: int, max_processes: int, limit: int) -> SandboxResult:
    program = _seccomp_program(os.uname().machine)
    seccomp_fd = None
    if program is not None:
        seccomp_fd = os.memfd_create("rlpost-seccomp", 0)
        os.write(seccomp_fd, program)
        os.lseek(seccomp_fd, 0, os.SEEK_SET)
    ctl_r, ctl_w = os.pipe()
    status_r, status_w = os.pipe()
    fds = (ctl_w, status_r, status_w, src_fd) + (() if seccomp_fd is None else (seccomp_fd,))
    uid = 10_000_000 + secrets.randbelow(10_000_000) if os.geteuid() == 0 else ""
    cfg = {"parent": os.getpid(), "ctl": ctl_w, "status_r": status_r, "status_w": status_w,
           "uid": uid, "timeout_s": timeout_s, "memory_mb": memory_mb}
    argv = [sys.executable, "-I", "-S", "-c", _launcher_source()]
    argv += [f"{k}={v}" for k, v in cfg.items()] + ["--"]
    argv += _bwrap_argv(bwrap, src_fd, seccomp_fd, status_w, cpu_s, memory_mb, file_size_mb,
                        max_processes)
    start = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdin=fin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=fds, env=_BASE_ENV, start_new_session=True)
    finally:
        for fd in fds:
            if fd != src_fd:  # src_fd belongs to the caller's TemporaryFile
                os.close(fd)
    out, err, ctl = _Capture(limit), _Capture(limit), _Capture(limit)
    try:
        timed_out = _pump(proc, {proc.stdout.fileno(): out, proc.stderr.fileno(): err,
                                 ctl_r: ctl}, start + timeout_s + _GRACE_S)
    finally:
        os.close(ctl_r)
        _reap(proc)
    return _result(ctl.data.decode(), out, err, time.monotonic() - start, timed_out, memory_mb)


def _pump(proc: subprocess.Popen, captures: dict[int, _Capture], kill_at: float) -> bool:
    """Read all pipes until EOF; at ``kill_at`` (the launcher should have ended by then) kill
    the launcher's group, which takes the sandbox with it. Returns whether that happened."""
    with selectors.DefaultSelector() as sel:
        for fd in captures:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            now = time.monotonic()
            if now >= kill_at:
                _kill_group(proc)
                return True
            for key, _ in sel.select(timeout=max(0.0, min(kill_at - now, 0.5))):
                chunk = os.read(key.fd, 65536)
                if chunk:
                    captures[key.fd].add(chunk)
                else:
                    sel.unregister(key.fd)
    return False


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap(proc: subprocess.Popen) -> None:
    """Wait for the launcher (it ends right after reaping); kill its group if it does not."""
    try:
        proc.wait(timeout=_GRACE_S)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.wait()
    finally:
        proc.stdout.close()
        proc.stderr.close()


def _result(ctl: str, out: _Capture, err: _Capture, wall_s: float, timed_out: bool,
            memory_mb: int) -> SandboxResult:
    """Turn the launcher's control messages into a SandboxResult."""
    lines = ctl.splitlines()
    layers = next((tuple(ln[7:].split(",")) for ln in lines if ln.startswith("layers ")), ())
    errors = [ln[6:] for ln in lines if ln.startswith("error ")]
    ends = [ln for ln in lines if ln.startswith(("exit ", "memory ")) or ln == "timeout"]
    status: Status
    code: int | None = None
    stderr = err.text()
    if "unstarted" in lines and not errors:
        # bwrap ran but never started init: the host cannot build the sandbox (namespaces off,
        # missing bind source...). That is no fault of the program: say what bwrap said.
        said = next((ln for ln in stderr.splitlines() if ln.startswith("bwrap:")), stderr.strip())
        raise SandboxUnavailable(f"rlpost sandbox: bubblewrap could not build the sandbox "
                                 f"({said[:300]}); it needs bubblewrap >= 0.8.0 and user "
                                 f"namespaces: {_USERNS_HINT}")
    if errors:
        status, stderr = "error", "\n".join(errors + [stderr])
    elif (ends and ends[-1] == "timeout") or (not ends and timed_out):
        status = "timeout"
    elif not ends:
        status, stderr = "error", "rlpost sandbox: the launcher ended unexpectedly\n" + stderr
    elif ends[-1].startswith("memory "):
        used = int(ends[-1].split()[1]) // (1024 * 1024)
        status, code = "killed", -signal.SIGKILL
        stderr += (f"\n[rlpost sandbox: killed: the sandbox's processes used {used} MB, over "
                   f"the {memory_mb} MB memory limit]")
    else:
        code = os.waitstatus_to_exitcode(int(ends[-1][5:]))
        status = "ok" if code == 0 else "failed" if code > 0 else "killed"
    return SandboxResult(status, code, out.text(), stderr, wall_s, layers)
