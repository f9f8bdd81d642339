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

from rewards.code_sandbox import SandboxResult, run_untrusted

IS_ROOT = os.geteuid() == 0


def _uid_processes(uid: int) -> list[str]:
    """`ps` rows (any state, zombies included) of processes running as ``uid``."""
    rows = subprocess.run(["ps", "-eo", "uid=,pid=,stat=,comm="], capture_output=True,
                          text=True, check=True).stdout.splitlines()
    return [r for r in rows if r.split()[0] == str(uid)]


def _zombie_children() -> list[str]:
    rows = subprocess.run(["ps", "-o", "pid=,stat=", "--ppid", str(os.getpid())],
                          capture_output=True, text=True).stdout.splitlines()
    return [r for r in rows if r.split()[1].startswith("Z")]


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))


def _first_line_uid(result: SandboxResult) -> int:
    return int(result.stdout.splitlines()[0])


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
    assert {"audit", "rlimits"} <= set(r.isolation)
    if IS_ROOT:
        assert {"uid", "netns", "mntns", "rofs"} <= set(r.isolation)


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
        if via_child and "netns" in r.isolation:
            assert "Network is unreachable" in r.stdout
        elif not via_child:
            assert "network access is blocked" in r.stderr
        with pytest.raises(BlockingIOError):
            listener.accept()


@pytest.mark.timeout(20)
def test_writes_outside_workdir_do_not_reach_host(scratch, open_dir):
    targets = [scratch / "pwned", open_dir / "pwned", Path("/tmp") / f"rlpost-leak-{uuid.uuid4().hex}"]
    src = "import os\nprint(os.getcwd())\nopen('inside.txt', 'w').write('ok')\n"
    for t in targets:
        src += f"try:\n    open({str(t)!r}, 'w').write('x')\nexcept OSError as e:\n    print(e)\n"
    r = run_untrusted(src)
    assert r.status == "ok", r.stderr
    assert [t for t in targets if t.exists()] == []
    assert not os.path.exists(r.stdout.splitlines()[0])  # the temp dir is gone too


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
    bomb = "import os\nprint(os.getuid(), flush=True)\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    r = run_untrusted(bomb, timeout_s=3, max_processes=8)
    assert r.status == "timeout" and r.wall_s < 3 + 2.5
    if IS_ROOT:
        assert _uid_processes(_first_line_uid(r)) == []
    assert _zombie_children() == []
    started = time.monotonic()
    assert run_untrusted("print(1)").stdout == "1\n"  # the host still runs sandboxes promptly
    assert time.monotonic() - started < 3


@pytest.mark.timeout(20)
@pytest.mark.skipif(not IS_ROOT, reason="RLIMIT_NPROC bounds the run only with its own uid")
def test_process_limit_is_enforced():
    src = ("import os, time\nn = 0\nfor _ in range(100):\n    try:\n        pid = os.fork()\n"
           "    except OSError:\n        continue\n    if pid == 0:\n        time.sleep(60)\n"
           "        os._exit(0)\n    n += 1\nprint(n)")
    r = run_untrusted(src, max_processes=6)
    assert r.status == "ok" and int(r.stdout) == 5  # 6 processes including the program itself


@pytest.mark.timeout(20)
def test_escaped_background_processes_are_killed():
    src = ("import os, time\nprint(os.getuid(), flush=True)\nif os.fork() == 0:\n    os.setsid()\n"
           "    if os.fork() == 0:\n        time.sleep(60)\n    os._exit(0)\ntime.sleep(0.3)\n")
    r = run_untrusted(src)
    assert r.status == "ok" and r.wall_s < 3
    if IS_ROOT:
        assert _uid_processes(_first_line_uid(r)) == []
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
    if "uid" in probe.isolation:  # only a different uid makes kill(-1) harmless to test
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
