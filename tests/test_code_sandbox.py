"""Tests for rewards/code_sandbox.py: hostile programs stay inside their limits, the host is unaffected.

Each hostile program reports what it managed to do on stdout; the tests check the host side
(listener, files, processes, this process's memory and signals), not only the program's word.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import rewards.code_sandbox as sandbox
from rewards.code_sandbox import SandboxUnavailable, run_untrusted

IS_ROOT = os.geteuid() == 0


def _tagged_processes(tag: str) -> list[str]:
    """`ps` rows (any state, zombies included) of processes named ``tag`` (see _NAME)."""
    rows = subprocess.run(["ps", "-eo", "pid=,stat=,comm="], capture_output=True, text=True,
                          check=True).stdout.splitlines()
    return [r for r in rows if r.split()[-1] == tag]


def _tag() -> str:
    return "rlp" + uuid.uuid4().hex[:12]  # 15 characters: the most a process name keeps


_NAME = "open('/proc/self/comm', 'w').write({tag!r})\n"  # children inherit the name


def _zombie_children() -> list[str]:
    rows = subprocess.run(["ps", "-o", "pid=,stat=", "--ppid", str(os.getpid())],
                          capture_output=True, text=True).stdout.splitlines()
    return [r for r in rows if r.split()[1].startswith("Z")]


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))


@pytest.fixture
def scratch():
    """A root-owned 0755 dir outside /tmp (in tests/), removed afterwards."""
    path = Path(__file__).parent / f".sandbox-scratch-{uuid.uuid4().hex}"
    path.mkdir(mode=0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
def open_dir(tmp_path):
    """A world-writable dir under /tmp (the worst case for a non-root writer)."""
    path = tmp_path / "open"
    path.mkdir()
    os.chmod(path, 0o777)
    return path


@pytest.mark.timeout(20)
def test_runs_program_with_empty_env_and_reports_layers():
    r = run_untrusted("import os, sys\nprint('hello', sys.stdin.read())\nprint(sorted(os.environ))",
                      stdin="from stdin")
    assert r.status == "ok" and r.returncode == 0
    assert r.stdout.splitlines() == ["hello from stdin", "['HOME', 'LANG', 'PATH', 'TMPDIR']"]
    assert {"userns", "pidns", "ipcns", "utsns", "netns", "mntns", "rofs", "seccomp", "nocaps",
            "memwatch", "audit", "rlimits"} <= set(r.isolation)
    assert ("uid" in r.isolation) == IS_ROOT  # root callers: bwrap runs as a fresh random uid


@pytest.mark.timeout(20)
def test_exit_statuses():
    assert run_untrusted("raise SystemExit(3)").returncode == 3
    failed = run_untrusted("1 / 0")
    assert failed.status == "failed" and "ZeroDivisionError" in failed.stderr
    killed = run_untrusted("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert (killed.status, killed.returncode) == ("killed", -signal.SIGKILL)
    with pytest.raises(ValueError):
        run_untrusted("pass", timeout_s=0)


CONNECT = "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')"
VIA_CHILD = ("import subprocess, sys\n"
             "r = subprocess.run([sys.executable, '-I', '-S', '-c', {code!r}],"
             " capture_output=True, text=True)\nprint(r.stdout, r.stderr)")


@pytest.mark.timeout(20)
@pytest.mark.parametrize("via_child", [False, True], ids=["in-process", "child-without-hook"])
def test_network_connection_never_reaches_host(via_child):
    """A listener on the host's loopback must not get a connection, with or without the hook."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        code = CONNECT.format(port=listener.getsockname()[1])
        r = run_untrusted(VIA_CHILD.format(code=code) if via_child else code)
        assert "connected\n" not in r.stdout
        if via_child and "netns" in r.isolation:  # the sandbox's own loopback: nobody listens
            assert "Connection refused" in r.stdout or "Network is unreachable" in r.stdout
        elif not via_child:
            assert "network access is blocked" in r.stderr
        with pytest.raises(BlockingIOError):
            listener.accept()


@pytest.mark.timeout(20)
def test_writes_outside_workdir_do_not_reach_host(scratch, open_dir):
    inside = f"rlpost-inside-{uuid.uuid4().hex}.txt"
    targets = [scratch / "pwned", open_dir / "pwned", Path("/tmp") / f"rlpost-leak-{uuid.uuid4().hex}"]
    src = f"import os\nprint(os.getcwd())\nopen({inside!r}, 'w').write('ok')\n"
    for t in targets:
        src += f"try:\n    open({str(t)!r}, 'w').write('x')\nexcept OSError as e:\n    print(e)\n"
    r = run_untrusted(src)
    assert r.status == "ok", r.stderr
    assert [t for t in targets if t.exists()] == []
    assert r.stdout.splitlines()[0] == "/tmp"  # a private tmpfs: nothing written there reaches the host
    assert not (Path("/tmp") / inside).exists()


@pytest.mark.timeout(20)
def test_deleting_host_files_fails(scratch, open_dir):
    victims = [scratch / "keep.txt", open_dir / "keep.txt"]
    for v in victims:
        v.write_text("precious")
        os.chmod(v, 0o666)
    src = "import os, shutil\n"
    for v in victims:
        src += (f"for f in (lambda: os.remove({str(v)!r}), lambda: shutil.rmtree({str(v.parent)!r})):\n"
                "    try:\n        f()\n    except OSError as e:\n        print(e)\n")
    r = run_untrusted(src)
    assert r.status == "ok", r.stderr
    assert [v.read_text() for v in victims] == ["precious", "precious"]


@pytest.mark.timeout(20)
def test_secret_in_host_environment_is_not_readable(monkeypatch):
    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("RLPOST_SECRET", secret)
    src = ("import os\nprint(dict(os.environ))\n"
           "for pid in [p for p in os.listdir('/proc') if p.isdigit()] + ['self']:\n"
           "    try:\n        print(open(f'/proc/{pid}/environ', 'rb').read())\n"
           "    except OSError:\n        pass\n")
    r = run_untrusted(src)
    assert r.status == "ok", r.stderr
    assert secret not in r.stdout and secret not in r.stderr


@pytest.mark.timeout(30)
def test_fork_bomb_is_contained_and_swept():
    tag = _tag()
    bomb = _NAME.format(tag=tag) + "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    r = run_untrusted(bomb, timeout_s=3, max_processes=8)
    assert r.status == "timeout" and r.wall_s < 3 + 2.5
    assert _tagged_processes(tag) == []
    assert _zombie_children() == []
    started = time.monotonic()
    assert run_untrusted("print(1)").stdout == "1\n"  # the host still runs sandboxes promptly
    assert time.monotonic() - started < 3


@pytest.mark.timeout(20)
def test_process_limit_is_enforced():
    """RLIMIT_NPROC counts per user namespace: it bounds this run only, root or not."""
    src = ("import os, time\nn = 0\nfor _ in range(100):\n    try:\n        pid = os.fork()\n"
           "    except OSError:\n        continue\n    if pid == 0:\n        time.sleep(60)\n"
           "        os._exit(0)\n    n += 1\nprint(n)")
    r = run_untrusted(src, max_processes=6)
    assert r.status == "ok" and int(r.stdout) == 5  # 6 processes including the program itself


@pytest.mark.timeout(20)
def test_escaped_background_processes_are_killed():
    tag = _tag()
    src = _NAME.format(tag=tag) + ("import os, time\nif os.fork() == 0:\n    os.setsid()\n"
           "    if os.fork() == 0:\n        time.sleep(60)\n    os._exit(0)\ntime.sleep(0.3)\n")
    r = run_untrusted(src)
    assert r.status == "ok" and r.wall_s < 3
    assert _tagged_processes(tag) == []
    assert _zombie_children() == []


@pytest.mark.timeout(30)
def test_memory_bomb_is_stopped_and_host_memory_unchanged():
    before = _rss_kib()
    r = run_untrusted("a = []\nwhile True:\n    a.append(bytearray(10**7))", memory_mb=256,
                      timeout_s=10)
    assert r.status in ("failed", "killed") and r.wall_s < 10
    assert r.status == "killed" or "MemoryError" in r.stderr
    assert _rss_kib() - before < 20_000


@pytest.mark.timeout(20)
def test_infinite_loop_killed_at_wall_limit():
    r = run_untrusted("while True:\n    pass", timeout_s=2, cpu_s=10)
    assert (r.status, r.returncode) == ("timeout", None)
    assert 2.0 <= r.wall_s < 3.0
    cpu = run_untrusted("while True:\n    pass", timeout_s=8, cpu_s=1)
    assert (cpu.status, cpu.returncode) == ("killed", -signal.SIGXCPU) and cpu.wall_s < 4


@pytest.mark.timeout(20)
def test_signalling_the_host_fails():
    probe = run_untrusted("pass")
    received: list[int] = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    me = os.getpid()
    attempts = [f"os.kill({me}, signal.SIGTERM)", f"os.killpg(os.getpgid({me}), signal.SIGTERM)",
                "os.kill(os.getppid(), signal.SIGTERM)",
                f"assert ctypes.CDLL(None).kill({me}, signal.SIGTERM) == 0",
                f"subprocess.run(['kill', '-TERM', '{me}'], check=True)"]
    if "pidns" in probe.isolation:  # only a pid namespace makes kill(-1) harmless to test
        attempts.append("ctypes.CDLL(None).kill(-1, signal.SIGKILL)")
    src = "import ctypes, os, signal, subprocess\n"
    for a in attempts:
        src += f"try:\n    {a}\n    print('sent')\nexcept Exception as e:\n    print('denied', type(e).__name__)\n"
    try:
        r = run_untrusted(src)
        time.sleep(0.2)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert received == []
    assert r.stdout.count("denied") >= 5, r.stdout


@pytest.mark.timeout(20)
def test_output_flood_is_truncated():
    r = run_untrusted("while True:\n    print('x' * 1000)", timeout_s=2, output_limit=4096)
    assert r.status == "timeout"
    assert r.stdout.startswith("x" * 1000) and len(r.stdout) < 4096 + 200
    assert "output truncated" in r.stdout
    finite = run_untrusted("print('y' * 200_000)", output_limit=1000)
    assert finite.status == "ok" and finite.stdout.split("\n")[0] == "y" * 1000
    assert "199001 more bytes dropped" in finite.stdout  # 200_000 + newline - 1000


@pytest.mark.timeout(30)
def test_concurrent_runs_from_threads():
    sources = [f"print({i} * {i})" for i in range(6)]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run_untrusted, sources))
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(6)]
    assert _zombie_children() == []


def test_module_imports_without_side_effects():
    """The launcher lives in the same file; importing it must not run it."""
    out = subprocess.run([sys.executable, "-c", "import rewards.code_sandbox as m; print(m.run_untrusted.__name__)"],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "run_untrusted"


@pytest.mark.timeout(20)
def test_seccomp_refuses_unix_sockets_and_unaccounted_memory():
    """The kernel (not the audit hook, which lets AF_UNIX through) refuses these with EPERM."""
    src = ("import ctypes, errno, os, socket\nlibc = ctypes.CDLL(None, use_errno=True)\n"
           "def call(name, fn):\n    try:\n        fn()\n        print(name, 'allowed')\n"
           "    except OSError as e:\n        print(name, errno.errorcode[e.errno])\n"
           "def raw(nr, *args):\n    if libc.syscall(nr, *args) < 0:\n"
           "        raise OSError(ctypes.get_errno(), 'syscall')\n"
           "call('unix', lambda: socket.socket(socket.AF_UNIX))\n"
           "call('pair', lambda: socket.socketpair())\n"
           "call('memfd', lambda: os.memfd_create('x'))\n"
           "call('shmget', lambda: raw({shmget}, 0, 4096, 0o1666))\n"
           "call('io_uring', lambda: raw(425, 1, ctypes.create_string_buffer(120)))\n"
           "call('inet', lambda: raw({socket}, 2, 1, 0))\n")
    nrs = {"x86_64": {"shmget": 29, "socket": 41}, "aarch64": {"shmget": 194, "socket": 198}}
    machine = os.uname().machine
    if machine not in nrs:
        pytest.skip(f"no seccomp filter for {machine}")
    r = run_untrusted(src.format(**nrs[machine]))
    assert "seccomp" in r.isolation, r
    assert r.stdout.splitlines() == ["unix EPERM", "pair EPERM", "memfd EPERM", "shmget EPERM",
                                     "io_uring EPERM", "inet allowed"]  # (netns covers AF_INET)


def test_refuses_to_run_without_bubblewrap_or_user_namespaces(monkeypatch, tmp_path):
    """No fallback to running unconfined: a one-line error that says what to install/enable."""
    monkeypatch.setattr(sandbox.shutil, "which", lambda *a, **k: None)
    sandbox._bwrap_path.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match="apt-get install -y bubblewrap") as missing:
            run_untrusted("print(1)")
        assert "\n" not in str(missing.value)
        monkeypatch.undo()
        knob = tmp_path / "max_user_namespaces"
        knob.write_text("0\n")
        monkeypatch.setattr(sandbox, "_USERNS_KNOBS", (str(knob),))
        sandbox._bwrap_path.cache_clear()
        with pytest.raises(SandboxUnavailable, match="user.max_user_namespaces") as off:
            run_untrusted("print(1)")
        assert "\n" not in str(off.value)
    finally:
        monkeypatch.undo()
        sandbox._bwrap_path.cache_clear()
    assert run_untrusted("print(1)").stdout == "1\n"


def test_exit_line_must_agree_with_init_exit_code():
    """The program shares init's uid and might write into init's pipe: a line counts only if it
    agrees with init's exit code (which bwrap passes on); else the code itself is reported."""
    assert sandbox._exit_line(["exit 768", "exit 0"], 3) == "exit 768"  # a forged 'exit 0' last
    assert sandbox._exit_line(["exit 0"], 3) == "exit 768"  # only forged lines: trust the code
    assert sandbox._exit_line(["exit 9"], 137) == "exit 9"  # SIGKILL
    assert sandbox._exit_line(["exit abc"], 137) == "exit 9"
