"""Running untrusted code: one Python program per call, contained by the kernel, killed on time.

``run_untrusted(source)`` starts a *launcher* (this file, run as a script by the same
interpreter with ``-I -S``), which sets the sandbox up and forks the program. Layers, outermost
first (``SandboxResult.isolation`` names the ones that were active):

uid      When the host runs as root, the program runs as a fresh random uid (10M..20M, no
         account), ``setgroups([])``, ``PR_SET_NO_NEW_PRIVS``. It cannot write anything it does
         not own, read other processes' ``/proc/<pid>/environ``, or signal the host: a non-root
         process cannot signal another uid's processes. ``RLIMIT_NPROC`` counts the processes
         of that uid only, so it really bounds a fork bomb. (Not root: same uid, weaker.)
netns    A new network namespace: no interface but a downed loopback, so no connection can be
         made, even by a child process or through ctypes.
mntns    A private mount namespace: ``/`` is re-bound read-only (``rofs``), ``/tmp``,
         ``/var/tmp`` and ``/dev/shm`` are fresh tmpfs of ``file_size_mb`` each, the working
         directory is a 0700 dir of the sandbox uid in that ``/tmp`` (same path as the host's
         ``mkdtemp`` dir). An interpreter under a private dir (pyenv in ``/root``) is
         bind-mounted read-only at its own path on a tmpfs that hides the rest of that dir.
audit    Always: an audit hook (``sys.addaudithook``, cannot be removed) installed before the
         program runs denies non-``AF_UNIX`` sockets, DNS, ``os.killpg`` and ``os.kill`` of
         anything but itself and its children. Defence in depth only: ctypes or a child
         interpreter bypass it; the kernel layers above are the guarantee.
rlimits  ``RLIMIT_CPU`` (soft ``cpu_s``), ``RLIMIT_AS``, ``RLIMIT_FSIZE``, ``RLIMIT_NPROC``,
         ``RLIMIT_NOFILE`` 256, ``RLIMIT_CORE`` 0.

The environment is empty except ``PATH``, ``LANG`` and ``HOME``/``TMPDIR`` (= the working dir),
so no secret of the host reaches the program. The interpreter runs with ``-I -S``: stdlib only.

Killing: the launcher is a child subreaper (every orphan of the program is re-parented to it).
When the program exits, or the host sends SIGTERM at the wall limit, the launcher SIGKILLs
every descendant (and, as root, every process of the sandbox uid) and reaps them until none is
left, so nothing escapes through ``setsid`` or double forks and no zombie remains. If the
launcher does not finish within ``_GRACE_S``, the host SIGKILLs its process group.
Why a launcher rather than ``preexec_fn``: ``preexec_fn`` is unsafe in threaded hosts (reward
threads, torch), and namespace/mount setup must happen as root before the uid drop.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
import time

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWNET = 0x20000, 0x10000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT = 1, 2, 4, 32
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 36, 38
_BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
_PROGRAM = "main.py"

# Runs first in the program's interpreter: installs the audit hook, then runs main.py as __main__.
_BOOT = r"""
import os, sys
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
sys.addaudithook(_rlpost_audit)
sys.argv = sys.argv[1:]
_m = type(sys)("__main__")
_m.__file__ = sys.argv[0]
sys.modules["__main__"] = _m
with open(sys.argv[0], "rb") as _f:
    _code = compile(_f.read(), sys.argv[0], "exec")
del _f, _m
exec(_code, sys.modules["__main__"].__dict__)
"""


# ----------------------------------------------------------------------------- launcher side
class _Stop(Exception):
    """Raised in the launcher by the host's SIGTERM (wall-clock limit reached)."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _c(text: str | None) -> bytes | None:
    return None if text is None else text.encode()


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(_libc().mount(_c(src), _c(target), _c(fstype), flags, _c(data or None)),
           f"mount {target}")


def _unshare(flags: int) -> bool:
    try:
        if hasattr(os, "unshare"):  # Python 3.12+
            os.unshare(flags)
        else:
            _check(_libc().unshare(flags), "unshare")
        return True
    except OSError:
        return False


def _hidden_ancestor(path: str) -> str | None:
    """The highest ancestor of ``path`` that other users cannot traverse (e.g. /root), if any."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        anc = "/" + "/".join(parts[:i])
        if not os.stat(anc).st_mode & 0o001:
            return anc
    return None


def _prepare_fs(cfg: dict, uid: int) -> list[str]:
    """Mount-namespace setup (see module docstring); returns extra layer names."""
    layers, mb, prefix = [], cfg["file_size_mb"], cfg["python_home"]
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    prefix_fd = os.open(prefix, os.O_PATH | os.O_DIRECTORY)
    hidden = _hidden_ancestor(prefix)
    try:
        _mount(None, "/", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY)
        layers.append("rofs")
    except OSError:
        pass
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(d):
            _mount("tmpfs", d, "tmpfs", _MS_NOSUID | _MS_NODEV,
                   f"size={mb}m,nr_inodes=4096,mode=1777")
    if hidden is not None:
        _mount("tmpfs", hidden, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")
    if hidden is not None or not os.path.isdir(prefix):
        os.makedirs(prefix, mode=0o755, exist_ok=True)
        _mount(f"/proc/self/fd/{prefix_fd}", prefix, None, _MS_BIND | _MS_REC)
        _mount(None, prefix, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID)
    os.close(prefix_fd)
    work = cfg["workdir"]
    if os.path.isdir(work):  # the host's temp dir lies outside /tmp: cover it with a tmpfs
        _mount("tmpfs", work, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={mb}m,mode=0700")
    os.makedirs(work, mode=0o700, exist_ok=True)
    os.chown(work, uid, uid)
    return layers


def _setup(cfg: dict, source: bytes) -> list[str]:
    """Enter namespaces, prepare the working dir, write the program; returns active layers."""
    uid, layers = cfg["uid"], []
    if uid is not None:
        if _unshare(_CLONE_NEWNET | _CLONE_NEWNS):
            layers += ["uid", "netns", "mntns"] + _prepare_fs(cfg, uid)
        else:
            layers += ["uid", "netns"] if _unshare(_CLONE_NEWNET) else ["uid"]
            os.chown(cfg["workdir"], uid, uid)
    elif _unshare(_CLONE_NEWUSER | _CLONE_NEWNET):
        layers.append("netns")
    path = os.path.join(cfg["workdir"], _PROGRAM)
    with open(path, "wb") as f:
        f.write(source)
    os.chmod(path, 0o644)
    if not os.access(cfg["python"], os.X_OK) or (uid is not None and "mntns" not in layers
                                                 and _hidden_ancestor(cfg["python_home"])):
        raise OSError(f"the sandbox user cannot run {cfg['python']}")
    return layers + ["audit", "rlimits"]


def _own_task_count(uid: int) -> int:
    n = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                n += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            continue
    return n


def _exec_program(cfg: dict, ctl: int, launcher: int) -> None:
    """Child of the launcher: limits, uid drop, exec. Never returns."""
    try:
        uid, mb = cfg["uid"], 1024 * 1024
        nproc = cfg["max_processes"] + (0 if uid is not None else _own_task_count(os.getuid()))
        for res, val in ((resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1)),
                         (resource.RLIMIT_AS, (cfg["memory_mb"] * mb,) * 2),
                         (resource.RLIMIT_FSIZE, (cfg["file_size_mb"] * mb,) * 2),
                         (resource.RLIMIT_NPROC, (nproc, nproc)),
                         (resource.RLIMIT_NOFILE, (256, 256)), (resource.RLIMIT_CORE, (0, 0))):
            resource.setrlimit(res, val)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        libc = _libc()
        _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl")
        _check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
        if os.getppid() != launcher:
            os._exit(137)
        os.chdir(cfg["workdir"])
        env = dict(_BASE_ENV, HOME=cfg["workdir"], TMPDIR=cfg["workdir"])
        os.execve(cfg["python"], [cfg["python"], "-I", "-S", "-c", _BOOT, _PROGRAM], env)
    except BaseException as e:  # noqa: BLE001 - report anything, then die without unwinding
        os.write(ctl, f"error {type(e).__name__}: {e}\n".encode())
    os._exit(127)


def _victims(me: int, uid: int | None) -> list[int]:
    """Descendants of ``me`` and, as root, every process of the sandbox uid."""
    children: dict[int, list[int]] = {}
    found: set[int] = set()
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(name))
            if uid is not None and os.stat(f"/proc/{name}").st_uid == uid:
                found.add(int(name))
        except (OSError, ValueError, IndexError):
            continue
    todo = [me]
    while todo:
        for pid in children.get(todo.pop(), ()):
            found.add(pid)
            todo.append(pid)
    found.discard(me)
    return sorted(found)


def _sweep(uid: int | None) -> None:
    """SIGKILL every descendant / sandbox-uid process and reap until none is left."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    me = os.getpid()
    while True:
        victims = _victims(me, uid)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] != 0:
                pass
        except ChildProcessError:
            if not victims:
                return
        time.sleep(0.002)


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop()


def _parse_args(argv: list[str]) -> dict:
    """``key=value`` arguments from the host; numbers become ints, an empty uid None."""
    cfg: dict = dict(a.split("=", 1) for a in argv)
    for key in ("ctl_fd", "cpu_s", "memory_mb", "file_size_mb", "max_processes"):
        cfg[key] = int(cfg[key])
    cfg["uid"] = int(cfg["uid"]) if cfg["uid"] else None
    return cfg


def _launch(cfg: dict) -> None:
    """Launcher entry point: report layers, run the program, sweep, report how it ended."""
    ctl = cfg["ctl_fd"]
    os.set_inheritable(ctl, False)
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        with open(os.path.join(cfg["workdir"], _PROGRAM), "rb") as f:
            source = f.read()
        layers = _setup(cfg, source)
        _check(_libc().prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl")
    except OSError as e:
        os.write(ctl, f"error sandbox setup failed: {e}\n".encode())
        return
    except _Stop:
        return
    os.write(ctl, f"layers {','.join(layers)}\n".encode())
    result = "timeout"
    try:
        pid = os.fork()
        if pid == 0:
            _exec_program(cfg, ctl, os.getppid())
        while True:
            done, status = os.waitpid(-1, 0)
            if done == pid:
                result = f"exit {status}"
                break
    except _Stop:
        pass
    finally:
        _sweep(cfg["uid"])
    os.write(ctl, f"{result}\n".encode())




if __name__ == "__main__":
    _launch(_parse_args(sys.argv[1:]))
    sys.exit(0)

# ----------------------------------------------------------------------------- host side
# Imported here, not at the top, so that the launcher (this file run as a script) starts fast.
import secrets  # noqa: E402
import selectors  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Literal  # noqa: E402

Status = Literal["ok", "failed", "timeout", "killed", "error"]
OUTPUT_LIMIT_BYTES = 64 * 1024
_GRACE_S = 2.0  # after the wall limit: time the launcher gets to sweep before its group is killed


@dataclass(frozen=True)
class SandboxResult:
    """How one untrusted run ended.

    status      ``ok`` exit code 0; ``failed`` exit code != 0 (e.g. an uncaught exception,
                MemoryError under RLIMIT_AS); ``timeout`` the wall limit was hit and everything
                was killed; ``killed`` ended by a signal (RLIMIT_CPU, a segfault...); ``error``
                the sandbox itself could not start the program (stderr says why).
    returncode  exit code, ``-signal`` when killed, ``None`` for timeout / error.
    stdout, stderr  decoded (UTF-8, invalid bytes replaced), each cut at the output limit with
                a note saying how many bytes were dropped.
    wall_s      seconds from start to the end of the sweep.
    isolation   the layers that were active (module docstring): uid, netns, mntns, rofs, audit,
                rlimits.
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

    ``timeout_s`` is the wall-clock limit for the whole run; ``cpu_s``, ``memory_mb`` (address
    space), ``file_size_mb`` (largest file, and size of each private tmpfs) and
    ``max_processes`` are per-run kernel limits. ``stdin`` is fed from an unlinked file.
    """
    if timeout_s <= 0 or min(cpu_s, memory_mb, file_size_mb, max_processes, output_limit) < 1:
        raise ValueError("run_untrusted: timeout_s and every limit must be positive")
    workdir = tempfile.mkdtemp(prefix="rlpost-sandbox-")
    try:
        with open(os.path.join(workdir, _PROGRAM), "w", encoding="utf-8") as f:
            f.write(source)
        cfg = {"workdir": workdir, "python": os.path.realpath(sys.executable),
               "python_home": os.path.realpath(sys.base_prefix),
               "uid": 10_000_000 + secrets.randbelow(10_000_000) if os.geteuid() == 0 else "",
               "cpu_s": cpu_s, "memory_mb": memory_mb, "file_size_mb": file_size_mb,
               "max_processes": max_processes}
        return _run_launcher(cfg, stdin, timeout_s, output_limit)
    finally:
        _remove_tree(workdir)


def _remove_tree(path: str) -> None:
    """rmtree, first making every dir writable again if the program locked one (same uid)."""
    try:
        shutil.rmtree(path)
    except PermissionError:
        for root, dirs, _ in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o700)
        shutil.rmtree(path)


def _run_launcher(cfg: dict, stdin: str, timeout_s: float, limit: int) -> SandboxResult:
    ctl_r, ctl_w = os.pipe()
    argv = [cfg["python"], "-I", "-S", os.path.realpath(__file__)]
    argv += [f"{k}={v}" for k, v in cfg.items()] + [f"ctl_fd={ctl_w}"]
    start = time.monotonic()
    try:
        with tempfile.TemporaryFile() as fin:
            fin.write(stdin.encode("utf-8"))
            fin.seek(0)
            proc = subprocess.Popen(argv, stdin=fin, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, pass_fds=(ctl_w,), env=_BASE_ENV,
                                    start_new_session=True)
    finally:
        os.close(ctl_w)
    out, err, ctl = _Capture(limit), _Capture(limit), _Capture(limit)
    try:
        timed_out = _pump(proc, {proc.stdout.fileno(): out, proc.stderr.fileno(): err,
                                 ctl_r: ctl}, start + timeout_s)
    finally:
        os.close(ctl_r)
        _reap(proc)
    return _result(ctl.data.decode(), out, err, time.monotonic() - start, timed_out)


def _pump(proc: subprocess.Popen, captures: dict[int, _Capture], deadline: float) -> bool:
    """Read all pipes until EOF; SIGTERM the launcher at ``deadline``; give up ``_GRACE_S``
    later (killing the launcher's group). Returns whether the deadline was reached."""
    kill_at = None
    with selectors.DefaultSelector() as sel:
        for fd in captures:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            now = time.monotonic()
            if kill_at is None and now >= deadline:
                kill_at = now + _GRACE_S
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            if kill_at is not None and now >= kill_at:
                _kill_group(proc)
                break
            wait = (deadline if kill_at is None else kill_at) - now
            for key, _ in sel.select(timeout=max(0.0, min(wait, 0.5))):
                chunk = os.read(key.fd, 65536)
                if chunk:
                    captures[key.fd].add(chunk)
                else:
                    sel.unregister(key.fd)
    return kill_at is not None


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap(proc: subprocess.Popen) -> None:
    """Wait for the launcher (it ends right after its sweep); kill its group if it does not."""
    try:
        proc.wait(timeout=_GRACE_S)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.wait()
    finally:
        proc.stdout.close()
        proc.stderr.close()


def _result(ctl: str, out: _Capture, err: _Capture, wall_s: float, timed_out: bool
            ) -> SandboxResult:
    """Turn the launcher's control messages into a SandboxResult."""
    lines = ctl.splitlines()
    layers = next((tuple(ln[7:].split(",")) for ln in lines if ln.startswith("layers ")), ())
    errors = [ln[6:] for ln in lines if ln.startswith("error ")]
    ends = [ln for ln in lines if ln.startswith("exit ") or ln == "timeout"]
    status: Status
    code: int | None = None
    stderr = err.text()
    if errors:
        status, stderr = "error", "\n".join(errors + [stderr])
    elif (ends and ends[-1] == "timeout") or (not ends and timed_out):
        status = "timeout"
    elif not ends:
        status, stderr = "error", "rlpost sandbox: the launcher ended unexpectedly\n" + stderr
    else:
        code = os.waitstatus_to_exitcode(int(ends[-1][5:]))
        status = "ok" if code == 0 else "failed" if code > 0 else "killed"
    return SandboxResult(status, code, out.text(), stderr, wall_s, layers)
