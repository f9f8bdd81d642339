"""The same dataset row gives the same prompt token ids on every path: rollouts, SFT and evaluation.

Each path is the real code (the rollout worker's batch builder, the SFT stage's tokenizer, the
evaluation runner's generation) with the engine replaced by a recorder of what it was given, on a
locally built BPE model with a ChatML chat template and a system prompt.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from rlpost.data import DatasetPrompts
from rlpost.evaluation.benchmarks import Benchmark
from rlpost.evaluation.runner import generate
from rlpost.prompting import PromptFormat
from rlpost.stages.sft import _tokenize
from rollouts.engine import Generation
from rollouts.worker import _generate_chunk
from tests.bpe_model import build_bpe_model_dir

ROW = {"prompt": "unused raw prompt", "question": "Tom has 3 apples and buys 4 more. How many now?", "answer": "7"}
FORMAT = PromptFormat(template="Q: {question}", chat_template=True, system_prompt="Answer with a number.")


class RecordingEngine:
    """Stands in for vLLM: records the prompt ids it is given and returns one empty completion each."""

    startup_s = 0.0

    def __init__(self):
        self.seen: list[list[int]] = []

    def generate(self, prompt_ids, n=1, **sampling):
        self.seen.extend(prompt_ids)
        return [[Generation((1,), (-0.1,), "7", "stop") for _ in range(n)] for _ in prompt_ids]


class Pool:
    def score(self, prompts, completions, completion_ids, columns):
        return SimpleNamespace(total=[1.0] * len(completions))

    def stats(self):
        return {}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    corpus = [ROW["question"], "Answer with a number.", "Q: how many apples?"] * 20
    return build_bpe_model_dir(tmp_path_factory.mktemp("bpe") / "m", corpus=corpus, vocab_size=300)


def test_rollout_sft_and_eval_paths_give_identical_prompt_ids(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "Q: " + ROW["question"]}],
        tokenize=True, add_generation_prompt=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)

    engine = RecordingEngine()
    spec = SimpleNamespace(prompts=DatasetPrompts((ROW,)), prompt_format=FORMAT, groups_per_batch=1, group_size=2,
                           temperature=1.0, max_tokens=4)
    _generate_chunk(spec, engine, tokenizer, Pool(), 0, 0, 1)
    rollout_ids = engine.seen[0]

    sft = _tokenize(tokenizer, FORMAT, {**ROW, "completion": "7"})
    sft_prompt_ids = [t for t, m in zip(sft["input_ids"], sft["completion_mask"]) if m == 0]

    eval_engine = RecordingEngine()
    generate(model_dir, Benchmark("one", [ROW]), n_samples=1, temperature=0.0, top_p=1.0, max_tokens=4,
             use_chat_template=None, seed=0, prompt_format=FORMAT, engine=eval_engine)
    eval_ids = eval_engine.seen[0]

    assert rollout_ids == sft_prompt_ids == eval_ids == expected
    assert tokenizer.decode(rollout_ids).count("Answer with a number.") == 1  # the system prompt went in once
