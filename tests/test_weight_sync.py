"""Shared-memory weight copies left by killed runs are removed when the next publisher starts.

A killed run never calls `WeightPublisher.close()`. The next publisher removes roots of its tag
whose owner (PID + start time recorded in `owner.json`, PID also in the name) is dead, old unowned
roots of its tag, and roots of other tags whose owner is certainly dead; it keeps roots whose owner
is alive (a concurrent run with the same tag) or cannot be judged.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from rollouts import weight_sync
from rollouts.weight_sync import OWNER_FILE, WeightPublisher, owner_is_dead, owner_record

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to judge owners")


@pytest.fixture
def base(tmp_path, monkeypatch):
    root = tmp_path / "shm"
    root.mkdir()
    monkeypatch.setattr(weight_sync, "shared_memory_base", lambda: root)
    return root


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not Path(f"/proc/{child.pid}").exists()
    return child.pid


def plant(base: Path, name: str, owner: dict | None) -> Path:
    root = base / name
    (root / "v000001").mkdir(parents=True)
    (root / "v000001" / "model.safetensors").write_bytes(b"\0" * 1024)
    if owner is not None:
        (root / OWNER_FILE).write_text(json.dumps(owner))
    return root


def test_leftovers_of_dead_owners_and_unowned_same_tag_roots_are_removed(base):
    me = owner_record()
    dead = dict(me, pid=dead_pid())
    reused = dict(me, start_time=me["start_time"] + 12345)  # our PID, but another process's start time
    same_dead = plant(base, f"rlpost-run-pid{dead['pid']}-abc_123", dead)
    same_unowned = plant(base, "rlpost-run-k2j4h1x9", None)  # naming before owners were recorded
    same_no_file = plant(base, f"rlpost-run-pid{dead['pid']}-zzz", None)  # killed before owner.json
    other_dead = plant(base, f"rlpost-other-pid{dead['pid']}-q1", dead)
    other_reused = plant(base, f"rlpost-other-pid{os.getpid()}-q2", reused)
    same_alive = plant(base, f"rlpost-run-pid{os.getpid()}-q3", me)  # a live run with the same tag
    other_alive = plant(base, f"rlpost-other-pid{os.getpid()}-q4", me)
    other_unowned = plant(base, "rlpost-other-k2j4h1x9", None)  # cannot tell: kept
    prefix_tag = plant(base, "rlpost-run-2-k2j4h1x9", None)  # unowned root of tag "run-2", not "run"
    other_host = plant(base, f"rlpost-run-pid{dead['pid']}-q5", dict(dead, host="elsewhere"))
    unrelated = plant(base, "something-else", None)

    publisher = WeightPublisher("run")
    try:
        removed = set(publisher.removed_leftovers)
        assert removed == {same_dead, same_unowned, same_no_file, other_dead, other_reused}
        for gone in removed:
            assert not gone.exists()
        for kept in (same_alive, other_alive, other_unowned, prefix_tag, other_host, unrelated):
            assert (kept / "v000001" / "model.safetensors").exists(), kept
        assert publisher.root.parent == base
        assert publisher.root.name.startswith(f"rlpost-run-pid{os.getpid()}-")
        assert json.loads((publisher.root / OWNER_FILE).read_text()) == owner_record()
        # a second publisher with the same tag in a live process leaves the first one alone
        second = WeightPublisher("run")
        assert publisher.root.exists() and publisher.root not in second.removed_leftovers
        second.close()
    finally:
        publisher.close()
    assert not publisher.root.exists()


def test_zombie_owner_counts_as_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while weight_sync._proc_stat(child.pid)[0] != "Z":  # exited, not yet reaped
            assert time.monotonic() < deadline
            time.sleep(0.05)
        owner = dict(owner_record(), pid=child.pid, start_time=weight_sync._proc_stat(child.pid)[1])
        assert owner_is_dead(owner)
    finally:
        child.wait()
    assert not owner_is_dead(owner_record())


CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
from rollouts.weight_sync import WeightPublisher
publisher = WeightPublisher({tag!r})
(publisher.root / "v000001").mkdir()
(publisher.root / "v000001" / "model.safetensors").write_bytes(bytes(4096))
print(publisher.root, flush=True)
time.sleep(600)
"""


def test_copy_left_by_a_killed_run_is_removed_by_the_next_run():
    """End to end under the real shared-memory root: SIGKILL a publishing process, start a new publisher."""
    tag = f"test-killed-{uuid.uuid4().hex[:8]}"
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(repo=str(REPO), tag=tag)],
                             stdout=subprocess.PIPE, text=True)
    try:
        leftover = Path(child.stdout.readline().strip())
        assert (leftover / "v000001" / "model.safetensors").exists()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert leftover.exists()  # nobody called close()
    publisher = WeightPublisher(tag)
    try:
        assert leftover in publisher.removed_leftovers
        assert not leftover.exists()
        assert publisher.root.exists()
    finally:
        publisher.close()
