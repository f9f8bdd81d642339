"""The rollout worker's loop (rollouts/worker.py) with a stand-in engine: the staleness throttle holds
however long the learner takes."""

from __future__ import annotations

import queue
import threading
import time

import rollouts.engine
from rewards.registry import RewardSpec
from rlpost.modeling import build_tokenizer
from rlpost.prompting import PromptFormat
from rollouts.engine import Generation
from rollouts.worker import WorkerSpec, worker_main


class StandInEngine:
    """Returns one fixed completion per sample; records nothing about weights but their versions."""

    startup_s = 0.0

    def __init__(self, model_dir, settings, lora_rank=None):
        self.reloads = []

    def generate(self, prompt_ids, *, n=1, **sampling):
        return [[Generation((5, 6), (-0.1, -0.2), "12", "length") for _ in range(n)] for _ in prompt_ids]

    def reload_weights(self, directory):
        self.reloads.append(directory)
        return 0.0

    def close(self):
        pass


class Prompts:
    def get(self, index):
        return f"{index}+1=", {}


def test_a_learner_slower_than_the_poll_interval_never_gets_a_batch_beyond_the_bound(tmp_path, monkeypatch):
    """max_staleness 0: after batch 0 the worker must wait for version 1 however long that takes. It polls
    its control queue once a second; a learner step of 2.5 s must not make it generate batch 1 with
    version 0 (a batch the learner would drop, its prompts lost)."""
    monkeypatch.setattr(rollouts.engine, "RolloutEngine", StandInEngine)
    build_tokenizer().save_pretrained(tmp_path)
    spec = WorkerSpec(model_dir=str(tmp_path), prompts=Prompts(), prompt_format=PromptFormat(),
                      rewards=[RewardSpec("tests.reward_fixtures:length_reward")], group_size=2,
                      groups_per_batch=2, temperature=1.0, max_tokens=2, max_staleness=0, reward_workers=1)
    samples, control, events = queue.Queue(), queue.Queue(), queue.Queue()
    thread = threading.Thread(target=worker_main, args=(spec, samples, control, events), daemon=True)
    thread.start()
    try:
        first = [samples.get(timeout=60) for _ in range(2)]
        assert [g.policy_version for g in first] == [0, 0]
        time.sleep(2.5)  # the learner's step 1
        assert samples.empty(), "the worker generated past the staleness bound while the learner was busy"
        control.put(("weights", 1, str(tmp_path)))
        second = [samples.get(timeout=60) for _ in range(2)]
        assert [(g.prompt_index, g.policy_version) for g in second] == [(2, 1), (3, 1)]
    finally:
        control.put(("stop",))
        thread.join(timeout=60)
    assert not thread.is_alive()
