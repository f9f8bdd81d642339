"""Rollout workers as Ray actors on a local cluster: two engines through the real `rlpost run`.

Weights reach both actors through Ray's object store here (`rollout.weight_transport=object_store`,
the path actors on other nodes take), one actor is SIGKILLed mid-run and must be replaced with the
current weights, and the run must end on-policy with every prompt trained exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from rollouts.weight_sync import shared_memory_base
from tests.spine_helpers import NO_EVAL, REPO, copy_sft, quickstart_cmd
from tests.test_rl_loop import (
    check_contiguous,
    grpo_record,
    ledger,
    metrics,
    wait_for_steps,
    worker_records,
)

pytestmark = pytest.mark.slow
pytest.importorskip("ray")


def test_two_ray_actors_share_batches_survive_a_kill_and_stay_on_policy(sft_run, tmp_path):
    copy_sft(sft_run, tmp_path)
    started = time.time()
    steps = 6
    cmd = quickstart_cmd(tmp_path, f"grpo.max_steps={steps}", "grpo.max_staleness=0", "grpo.eval_steps=3",
                         "rollout.backend=ray", "rollout.workers=2", "rollout.weight_transport=object_store",
                         NO_EVAL)  # nothing here reads an evaluation; the probes at steps 3 and 6 still run
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for_steps(proc, tmp_path / "grpo" / "ledger.jsonl", 1, timeout_s=500)
        victim = next(r for r in worker_records(tmp_path) if r["event"] == "ready" and r["worker"] == 0)["pid"]
        os.kill(victim, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=500)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    rows = ledger(tmp_path)
    check_contiguous(rows, steps, 4, 4)
    for row in rows:  # max_staleness 0: both engines held the learner's weights for every chunk
        assert row["policy_versions"] == [row["step"] - 1] * 4, row
    events = [(r["event"], r["worker"]) for r in worker_records(tmp_path)]
    assert events.count(("died", 0)) == 1 and events.count(("ready", 0)) == 2, events
    logged = metrics(tmp_path)
    assert logged[-1]["rollout/worker_restarts"] == 1.0
    assert any("sync/reload_s/worker_0" in m and "sync/reload_s/worker_1" in m for m in logged)
    probes = [m["sync/logprob_mismatch_max"] for m in logged if "sync/logprob_mismatch_max" in m]
    assert len(probes) == 2 and max(probes) <= 1e-3  # both engines run the learner's weights after each sync
    assert grpo_record(tmp_path)["worker_restarts"] == 1
    # the killed actor's copy of the weights (it never closed) was removed by its replacement
    assert not [p for p in shared_memory_base().glob("rlpost-ray-weights-*") if p.stat().st_mtime >= started]
