"""The rollout fleet (rollouts/fleet.py) against a scripted transport: how batches are shared out, the
staleness throttle with several workers, and restarts that lose and repeat no prompt."""

from __future__ import annotations

import pytest

from rewards.registry import RewardSpec
from rlpost.prompting import PromptFormat
from rollouts.buffer import RolloutGroup
from rollouts.fleet import RolloutFleet
from rollouts.worker import WorkerSpec


class ScriptedTransport:
    """Workers that answer one request per `wait`, in order, with groups tagged by the weights they hold.

    `sent` records every request; `kill(w)` makes worker w die before answering its next request."""

    def __init__(self):
        self.inbox: dict[int, list[tuple]] = {}
        self.version: dict[int, int] = {}
        self.sent: list[tuple[int, tuple]] = []
        self.starts: list[tuple[int, str | None, int]] = []  # (worker, start_weights, requests sent before)
        self.doomed: set[int] = set()

    def start(self, worker_id, spec):
        self.inbox[worker_id] = [("ready",)]
        self.version[worker_id] = spec.start_version
        self.starts.append((worker_id, spec.start_weights, len(self.sent)))
        self.spec = spec

    def send(self, worker_id, message):
        self.sent.append((worker_id, message))
        self.inbox[worker_id].append(message)

    def kill(self, worker_id):
        self.doomed.add(worker_id)

    def pid(self, worker_id):
        return 1000 + worker_id

    def close(self):
        pass

    def wait(self, timeout_s):
        events = []
        for worker_id, inbox in self.inbox.items():
            if worker_id in self.doomed:
                self.doomed.discard(worker_id)
                inbox.clear()
                events.append((worker_id, ("died", "killed by the test")))
                continue
            if not inbox:
                continue
            message = inbox.pop(0)
            kind = message[0]
            if kind == "ready":
                events.append((worker_id, ("ready", 0.0, None)))
            elif kind == "weights":
                self.version[worker_id] = message[1]
                events.append((worker_id, ("synced", message[1], 0.01)))
            elif kind == "batch":
                _, batch, chunk, first, count = message
                groups = [group(i, self.version[worker_id]) for i in range(first, first + count)]
                events.append((worker_id, ("batch", batch, chunk, groups, chunk_metrics(count))))
            elif kind == "generate":
                events.append((worker_id, ("generations", message[1], [[f"w{worker_id}:{p}"] for p in message[2]])))
        if not events and timeout_s > 0 and not any(self.inbox.values()):
            raise AssertionError("the fleet waits for a reply no worker will send")
        return events


def group(index: int, version: int) -> RolloutGroup:
    return RolloutGroup(index, f"p{index}", [index], [[1], [2]], [[-0.1], [-0.2]], ["a", "b"], [1.0, 0.0], version)


def chunk_metrics(count: int) -> dict[str, float]:
    return {"rollout/tokens": 2.0 * count, "rollout/generate_s": 0.1, "rollout/score_s": 0.01,
            "rollout/batch_s": 0.11, "reward/samples": 2.0 * count, "reward/r/latency_p50_s": 0.001}


def spec(groups_per_batch=5, max_staleness=0, **starts) -> WorkerSpec:
    return WorkerSpec(model_dir="unused", prompts=None, prompt_format=PromptFormat(),
                      rewards=[RewardSpec("arithmetic_exact")], group_size=2, groups_per_batch=groups_per_batch,
                      temperature=1.0, max_tokens=2, max_staleness=max_staleness, **starts)


def run_steps(fleet: RolloutFleet, steps: range) -> list[list[RolloutGroup]]:
    batches = []
    for step in steps:
        groups, _ = fleet.take(step, timeout_s=5)
        batches.append(groups)
        fleet.publish(step + 1, f"/shm/v{step + 1}")
    return batches


def test_a_batch_is_shared_out_in_contiguous_chunks_and_comes_back_in_prompt_order():
    transport = ScriptedTransport()
    fleet = RolloutFleet(spec(groups_per_batch=5, start_prompt_index=40, start_batch=8, start_version=8),
                         transport, workers=2)
    fleet.start()
    assert fleet.chunk_sizes == [3, 2]
    batches = run_steps(fleet, range(8, 11))
    assert [[g.prompt_index for g in b] for b in batches] == [list(range(40 + 5 * k, 45 + 5 * k)) for k in range(3)]
    chunks = [(w, m[1:]) for w, m in transport.sent if m[0] == "batch"]
    assert chunks[:2] == [(0, (8, 0, 40, 3)), (1, (8, 1, 43, 2))]
    assert {w for w, _ in chunks} == {0, 1}  # both engines generate


@pytest.mark.parametrize("max_staleness", [0, 1, 2])
def test_no_chunk_is_sent_to_a_worker_whose_weights_would_be_beyond_the_bound(max_staleness):
    transport = ScriptedTransport()
    fleet = RolloutFleet(spec(groups_per_batch=4, max_staleness=max_staleness), transport, workers=3)
    fleet.start()
    batches = run_steps(fleet, range(6))
    held: dict[int, int] = {0: 0, 1: 0, 2: 0}
    for worker_id, message in transport.sent:
        if message[0] == "weights":
            held[worker_id] = message[1]
        elif message[0] == "batch":
            assert message[1] - held[worker_id] <= max_staleness, (worker_id, message, held)
    for step, groups in enumerate(batches):
        assert all(0 <= step - g.policy_version <= max_staleness for g in groups)
    if max_staleness == 0:
        assert all(g.policy_version == step for step, groups in enumerate(batches) for g in groups)
    else:  # some chunks are generated ahead of the learner
        assert any(g.policy_version < step for step, groups in enumerate(batches) for g in groups)


def test_a_killed_worker_is_started_again_with_the_newest_weights_and_its_chunk_is_generated_once():
    transport = ScriptedTransport()
    events = []
    fleet = RolloutFleet(spec(groups_per_batch=4, max_staleness=1), transport, workers=2, on_event=events.append)
    fleet.start()
    run_steps(fleet, range(3))
    transport.kill(1)
    batches = run_steps(fleet, range(3, 6))
    transport.kill(0)
    transport.kill(1)
    batches += run_steps(fleet, range(6, 8))
    indices = [g.prompt_index for b in batches for g in b]
    assert indices == list(range(12, 32)), "a prompt was lost or generated twice"
    assert fleet.restarts == 3
    # replacements start on the stage's input (a directory named at launch may be rotated away while the
    # engine starts), and the first thing each is sent is the newest weights
    assert [(w, weights) for w, weights, _ in transport.starts[2:]] == [(1, None), (0, None), (1, None)]
    for (worker_id, _, before), version in zip(transport.starts[2:], (3, 6, 6)):
        first = next(m for w, m in transport.sent[before:] if w == worker_id)
        assert first == ("weights", version, f"/shm/v{version}"), (worker_id, first)
    assert [e["event"] for e in events].count("died") == 3
    assert fleet.sync_metrics()["rollout/worker_restarts"] == 3.0


def test_generate_shares_prompts_out_and_survives_a_death():
    transport = ScriptedTransport()
    fleet = RolloutFleet(spec(groups_per_batch=2), transport, workers=2)
    fleet.start()
    transport.kill(1)
    out = fleet.generate("eval", [[1], [2], [3]], temperature=0.0)
    assert out == [["w0:[1]"], ["w0:[2]"], ["w1:[3]"]]
    assert fleet.restarts == 1


def test_deaths_in_a_row_without_progress_stop_the_run():
    transport = ScriptedTransport()
    fleet = RolloutFleet(spec(groups_per_batch=2), transport, workers=1, max_restarts=2)
    fleet.start()
    original_start = transport.start

    def start_doomed(worker_id, worker_spec):
        original_start(worker_id, worker_spec)
        transport.doomed.add(worker_id)

    transport.start = start_doomed
    transport.kill(0)
    with pytest.raises(RuntimeError, match="died 3 times in a row"):
        fleet.take(0, timeout_s=5)


def test_a_worker_that_fails_while_starting_stops_the_run_with_its_error():
    transport = ScriptedTransport()
    fleet = RolloutFleet(spec(), transport, workers=1)
    transport.start(0, spec())
    transport.inbox[0] = []
    fleet.workers[0].error = "Traceback: no model here"
    with pytest.raises(RuntimeError, match="failed while starting its engine:\nTraceback: no model here"):
        fleet._handle(0, ("died", "exit code 1"))


def test_merged_metrics_sum_tokens_and_rewards_counters_over_chunks():
    transport = ScriptedTransport()
    fleet = RolloutFleet(spec(groups_per_batch=4), transport, workers=2)
    fleet.start()
    _, metrics = fleet.take(0, timeout_s=5)
    assert metrics["rollout/tokens"] == 8.0
    assert metrics["rollout/tokens_per_s"] == pytest.approx(80.0)  # 8 tokens, chunks in parallel, 0.1 s each
    assert metrics["reward/samples"] == 8.0
    assert metrics["reward/r/latency_p50_s"] == 0.001
    assert metrics["rollout/reward_mean"] == 0.5
