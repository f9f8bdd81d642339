"""Canaries for rewards/code_sandbox.py: planted on the host, checked there after hostile runs.

Every check runs twice: as the caller of the test (root here) and as user ``nobody`` (via
``setpriv``), because a sandbox must be as strong for an ordinary user, whose files, processes and
environment are the program's natural targets. For the ``nobody`` run this file is executed as a
script (``python3 -I tests/test_sandbox_canaries.py GROUP``, stdlib only, so it works with a system
interpreter nobody can read) and prints what it found as JSON. The venv's interpreter lives in
/root (0700), which nobody cannot traverse; the script therefore runs under the system python3,
which also becomes the sandbox's interpreter for that run.

Groups (each returns ``{canary: what went wrong}``, empty when every canary survived):
probe    one program tries everything at once: the caller's secret (environment, /proc environ),
         a file outside the view and this test file, deleting and creating host files, TCP and
         Unix (path and abstract) listeners on the host, signalling a host process and the
         caller, SysV shared memory, listing host processes, writing under every read-only mount.
bombs    a fork bomb (contained, nothing left afterwards) and a memory bomb spread over several
         processes, each under the per-process limit, together over the per-sandbox bound.
orphans  a caller process running a sleeping program is SIGKILLed mid-run: nothing survives.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

try:
    import pytest
except ImportError:  # run as a script by an interpreter without pytest (the non-root run)
    pytest = None

REPO = Path(__file__).resolve().parents[1]
TEST_FILE_MARKER = "rlpost-canary-test-file-marker-5d1e0c"  # only in this file: proof of reading it
NOBODY = 65534
WRITABLE_MOUNTS = ("/tmp", "/dev/shm", "/proc", "/dev/pts")

PROBE = r"""
import ctypes, errno, json, os, socket, subprocess, sys
cfg = CFG
out = {}
libc = ctypes.CDLL(None, use_errno=True)
def attempt(name, fn):
    try:
        out[name] = "DONE %r" % (fn(),)
    except BaseException as e:
        out[name] = "refused %s: %s" % (type(e).__name__, e)
def checked(rc):
    if rc < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return rc
out["environ"] = dict(os.environ)
dumps = []
for pid in [p for p in os.listdir("/proc") if p.isdigit()] + ["self", str(cfg["caller_pid"])]:
    try:
        dumps.append(open("/proc/%s/environ" % pid, "rb").read().decode(errors="replace"))
    except OSError:
        pass
out["proc_environ"] = dumps
attempt("read_secret_file", lambda: open(cfg["secret_file"]).read())
attempt("read_test_file", lambda: open(cfg["test_file"]).read())
attempt("delete_file", lambda: os.remove(cfg["victim_file"]))
attempt("rmtree", lambda: __import__("shutil").rmtree(cfg["victim_dir"]))
attempt("create_file", lambda: open(cfg["new_file"], "w").write("x"))
attempt("shmget", lambda: checked(libc.shmget(cfg["shm_key"], 1 << 20, 0o1000 | 0o666)))
out["proc_pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
out["hostname"] = socket.gethostname()
ro = {}
with open("/proc/self/mountinfo") as f:
    points = {ln.split()[4] for ln in f}
points |= {"/", "/usr/lib", "/dev", sys.prefix, os.path.dirname(sys.executable),
           os.path.dirname(os.__file__)}
for mp in sorted(points):
    if mp in cfg["writable"] or not os.path.isdir(mp):
        continue
    probe = os.path.join(mp, ".rlpost-ro-probe")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
        os.unlink(probe)
        ro[mp] = "WROTE"
    except OSError as e:
        ro[mp] = errno.errorcode.get(e.errno, str(e.errno))
out["ro"] = ro
child = subprocess.run([sys.executable, "-I", "-S", "-c", cfg["child"], json.dumps(cfg)],
                       capture_output=True, text=True)  # a fresh interpreter: no audit hook
out["child"] = child.stdout + child.stderr
attempt("kill_victim_libc", lambda: checked(libc.kill(cfg["victim_pid"], 9)))
attempt("kill_caller_libc", lambda: checked(libc.kill(cfg["caller_pid"], 15)))
print(json.dumps(out), flush=True)
libc.kill(-1, 9)  # everything this uid may signal: in a pid namespace, only the sandbox
"""

PROBE_CHILD = r"""
import json, socket, sys
cfg = json.loads(sys.argv[1])
res = {}
def attempt(name, fn):
    try:
        res[name] = "DONE %r" % (fn(),)
    except BaseException as e:
        res[name] = "refused %s: %s" % (type(e).__name__, e)
def unix(addr):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(1)
    s.connect(addr)
    return "connected"
attempt("tcp", lambda: socket.create_connection(("127.0.0.1", cfg["tcp_port"]), 1) and "connected")
attempt("unix_path", lambda: unix(cfg["unix_path"]))
attempt("unix_abstract", lambda: unix("\0" + cfg["abstract"]))
attempt("socketpair", lambda: socket.socketpair() and "made")
print(json.dumps(res))
"""


def _run_untrusted():
    from rewards.code_sandbox import run_untrusted  # noqa: PLC0415 - after sys.path is set

    return run_untrusted


def _shm_segments() -> dict[int, int]:
    """SysV shared memory segments of the host's IPC namespace: key -> shmid."""
    with open("/proc/sysvipc/shm") as f:
        rows = [ln.split() for ln in f.read().splitlines()[1:]]
    return {int(r[0]): int(r[1]) for r in rows if r}


def _remove_shm(shmid: int) -> None:
    ctypes.CDLL(None).shmctl(shmid, 0, None)  # IPC_RMID


def check_probe() -> dict[str, str]:
    run_untrusted = _run_untrusted()
    problems: dict[str, str] = {}
    secret = f"s3cret-{uuid.uuid4().hex}"
    key = 0x5EED0000 + (os.getpid() & 0xFFFF)
    base = Path(tempfile.mkdtemp(prefix="rlpost-canary-"))
    victim = subprocess.Popen(["sleep", "60"])
    listeners = []
    os.environ["RLPOST_CANARY_SECRET"] = secret
    try:
        os.chmod(base, 0o755)
        (base / "secret.txt").write_text(secret)
        os.chmod(base / "secret.txt", 0o644)
        open_dir = base / "open"
        open_dir.mkdir()
        os.chmod(open_dir, 0o777)
        (open_dir / "keep.txt").write_text("precious")
        os.chmod(open_dir / "keep.txt", 0o666)
        tcp = socket.socket()
        tcp.bind(("127.0.0.1", 0))
        unix_path = str(base / "sock")
        unix = socket.socket(socket.AF_UNIX)
        unix.bind(unix_path)
        os.chmod(unix_path, 0o777)
        abstract = f"rlpost-canary-{uuid.uuid4().hex}"
        abstract_sock = socket.socket(socket.AF_UNIX)
        abstract_sock.bind("\0" + abstract)
        listeners = [("tcp", tcp), ("unix_path", unix), ("unix_abstract", abstract_sock)]
        for _, s in listeners:
            s.listen(8)
            s.setblocking(False)
        cfg = {"caller_pid": os.getpid(), "secret_file": str(base / "secret.txt"),
               "test_file": str(Path(__file__).resolve()),
               "victim_file": str(open_dir / "keep.txt"),
               "victim_dir": str(open_dir), "new_file": str(open_dir / "pwned"),
               "shm_key": key, "tcp_port": tcp.getsockname()[1], "unix_path": unix_path,
               "abstract": abstract, "victim_pid": victim.pid, "writable": list(WRITABLE_MOUNTS),
               "child": PROBE_CHILD}
        r = run_untrusted(PROBE.replace("CFG", repr(cfg)), timeout_s=20)
        said = r.stdout + r.stderr
        try:
            out = json.loads(r.stdout.splitlines()[0])
        except (IndexError, ValueError):
            return {"probe": f"the probe did not report ({r.status}): {said[-800:]}"}
        if secret in said:
            problems["secret"] = "the caller's secret reached the program"
        if TEST_FILE_MARKER in said:
            problems["test_file"] = "the program read its own test file"
        for name in ("read_secret_file", "read_test_file", "delete_file", "rmtree", "create_file",
                     "shmget", "kill_victim_libc", "kill_caller_libc"):
            if out[name].startswith("DONE"):
                problems[name] = out[name][:200]
        if (open_dir / "keep.txt").read_text() != "precious" or (open_dir / "pwned").exists():
            problems["host_files"] = "a host file was deleted or created"
        for name, s in listeners:
            try:
                s.accept()
                problems[f"listener_{name}"] = "the host listener got a connection"
            except BlockingIOError:
                pass
        child = json.loads(out["child"].splitlines()[0]) if out["child"].startswith("{") else {}
        for name in ("tcp", "unix_path", "unix_abstract", "socketpair"):
            if not child.get(name, "").startswith("refused"):
                problems[f"child_{name}"] = child.get(name, out["child"][-300:])
        if victim.poll() is not None:
            problems["victim"] = "a host process was killed"
        if key in _shm_segments():
            problems["shm"] = "SysV shared memory created by the program outlived it"
        pids = out["proc_pids"]
        if len(pids) > 8 or max(pids, default=0) > 50:
            problems["proc"] = f"host processes are visible: {len(pids)} pids up to {max(pids)}"
        if out["hostname"] == socket.gethostname():
            problems["hostname"] = "the host's hostname is visible"
        not_ro = {mp: e for mp, e in out["ro"].items() if e != "EROFS"}
        if not_ro or "/" not in out["ro"]:
            problems["rofs"] = f"writes not refused as read-only: {not_ro}"
    finally:
        os.environ.pop("RLPOST_CANARY_SECRET", None)
        victim.kill()
        victim.wait()
        for _, s in listeners:
            s.close()
        if key in _shm_segments():
            _remove_shm(_shm_segments()[key])
        _remove_tree(base)
    return problems


def _remove_tree(path: Path) -> None:
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o700)
    shutil.rmtree(path, ignore_errors=True)


def _processes() -> dict[int, tuple[str, str, int]]:
    """Every process of the host: pid -> (comm, state, ppid)."""
    procs = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index(b"(") + 1:stat.rindex(b")")].decode(errors="replace")
        fields = stat[stat.rindex(b")") + 2:].split()
        procs[int(name)] = (comm, fields[0].decode(), int(fields[1]))
    return procs


def _tagged(tag: str, live_only: bool = False) -> list[int]:
    return [pid for pid, (comm, state, _) in _processes().items()
            if comm == tag and not (live_only and state in ("Z", "X"))]


def _tag() -> str:
    return "rlp" + uuid.uuid4().hex[:12]  # 15 characters: the most a process name keeps


def _set_name(tag: str) -> str:
    return f"open('/proc/self/comm', 'w').write({tag!r})\n"


def check_bombs() -> dict[str, str]:
    run_untrusted = _run_untrusted()
    problems: dict[str, str] = {}
    tag = _tag()
    bomb = _set_name(tag) + ("import os\nwhile True:\n    try:\n        os.fork()\n"
                             "    except OSError:\n        pass\n")
    r = run_untrusted(bomb, timeout_s=2, max_processes=8)
    if r.status != "timeout" or r.wall_s > 4:
        problems["fork_bomb"] = f"{r.status} after {r.wall_s:.1f} s: {r.stderr[-300:]}"
    left = _tagged(tag)
    if left:
        problems["fork_bomb_left"] = f"{len(left)} processes of the fork bomb are left"
    if subprocess.run(["true"]).returncode != 0:
        problems["fork_bomb_host"] = "the host cannot start a process any more"
    # 4 children of 120 MB each: every one is within RLIMIT_AS (200 MB), together 480 MB > 200.
    spread = ("import os, sys, time\nfor _ in range(4):\n    if os.fork() == 0:\n"
              "        held = [b'x' * (10 << 20) for _ in range(12)]\n        time.sleep(1)\n"
              "        print('held', flush=True)\n        time.sleep(5)\n        os._exit(0)\n"
              "for _ in range(4):\n    os.wait()\nprint('done', flush=True)\n")
    r = run_untrusted(spread, memory_mb=200, timeout_s=15)
    if r.stdout.count("held") > 1 or r.status != "killed" or "memory limit" not in r.stderr:
        problems["memory_bomb"] = (f"{r.status}, {r.stdout.count('held')} of 4 processes held "
                                   f"120 MB under a 200 MB bound: {r.stderr[-300:]}")
    return problems


CALLER = """
import sys
sys.path.insert(0, sys.argv[1])
from rewards.code_sandbox import run_untrusted
run_untrusted(sys.stdin.read(), timeout_s=120, cpu_s=120)
"""


def _descendants(pid: int) -> list[int]:
    procs = _processes()
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, (_, _, ppid) in procs.items() if ppid == parent]
        found += kids
        todo += kids
    return found


def check_orphans() -> dict[str, str]:
    tag = _tag()
    program = _set_name(tag) + "import time\ntime.sleep(600)\n"
    caller = subprocess.Popen([sys.executable, "-I", "-c", CALLER, str(REPO)],
                              stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        caller.stdin.write(program.encode())
        caller.stdin.close()
        deadline = time.monotonic() + 20
        while not _tagged(tag, live_only=True):
            if time.monotonic() > deadline or caller.poll() is not None:
                return {"orphans": f"the sleeping program never started: "
                                   f"{caller.stderr.read().decode(errors='replace')[-500:]}"}
            time.sleep(0.02)
        chain = _descendants(caller.pid)  # launcher, bwrap, init, program
        caller.kill()
        caller.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            procs = _processes()
            alive = [p for p in chain if p in procs and procs[p][1] not in ("Z", "X")]
            if not alive and not _tagged(tag, live_only=True):
                return {}
            time.sleep(0.05)
        described = [f"{p} {procs[p][0]} ppid={procs[p][2]}" for p in alive]
        return {"orphans": f"5 s after its caller was killed, the sandbox lives on: {described}"}
    finally:
        for pid in _tagged(tag, live_only=True) + _descendants(caller.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if caller.poll() is None:
            caller.kill()
            caller.wait()
        caller.stderr.close()


GROUPS = {"probe": check_probe, "bombs": check_bombs, "orphans": check_orphans}


def _nobody_python() -> str | None:
    """An interpreter that user nobody can run (and that can run the sandbox), if any."""
    for candidate in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        path = os.path.realpath(candidate)
        reachable = all(os.stat(p).st_mode & 0o001 for p in Path(path).parents)
        if reachable and os.stat(path).st_mode & 0o005 == 0o005:
            check = "import sys; print(sys.version_info >= (3, 9))"
            version = subprocess.run([path, "-I", "-c", check], capture_output=True,
                                     text=True).stdout.strip()
            if version == "True":
                return path
    return None


def run_group_as_nobody(group: str) -> dict[str, str]:
    python = _nobody_python()
    if os.geteuid() != 0 or shutil.which("setpriv") is None or python is None:
        pytest.skip("needs root, setpriv and a python3 that user nobody can run")
    if not all(os.stat(p).st_mode & 0o001 for p in Path(__file__).resolve().parents):
        pytest.skip("user nobody cannot reach the repository")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/"}
    done = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           python, "-I", str(Path(__file__).resolve()), group],
                          capture_output=True, text=True, env=env, cwd="/", timeout=100)
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"nobody_run": f"exit {done.returncode}: {(done.stdout + done.stderr)[-1500:]}"}


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    print(json.dumps(GROUPS[sys.argv[1]]()))

if pytest is not None:
    @pytest.mark.timeout(120)
    @pytest.mark.parametrize("group", sorted(GROUPS))
    @pytest.mark.parametrize("user", ["caller", "nobody"])
    def test_canaries_survive(user: str, group: str) -> None:
        problems = GROUPS[group]() if user == "caller" else run_group_as_nobody(group)
        assert problems == {}
