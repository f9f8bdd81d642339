"""The vLLM engine: generation with sampling logprobs, and in-place weight reload that really changes the policy.

After each reload, vLLM's sampling logprobs must equal the learner's (transformers) logprobs for the
same tokens and weights: max |diff| <= 1e-3 in float32. This is what makes rollout and learner see
the same policy.
"""

from __future__ import annotations

import pytest
import torch

from rlpost.modeling import ModelShape, build_model, build_tokenizer, save_pretrained
from rollouts.weight_sync import WeightPublisher

pytestmark = pytest.mark.slow

SHAPE = ModelShape(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128)  # head_dim 32: vLLM CPU attention rejects 16


def learner_logprobs(model, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + completion_ids])).logits[0].float()
    logps = torch.log_softmax(logits, dim=-1)
    start = len(prompt_ids) - 1
    return [logps[start + i, tok].item() for i, tok in enumerate(completion_ids)]


def max_mismatch(model, prompts, outputs) -> float:
    worst = 0.0
    for prompt_ids, gens in zip(prompts, outputs):
        for gen in gens:
            ours = learner_logprobs(model, prompt_ids, list(gen.token_ids))
            worst = max(worst, max(abs(a - b) for a, b in zip(ours, gen.logprobs)))
    return worst


@pytest.fixture(scope="module")
def engine_and_models(tmp_path_factory):
    from rollouts.engine import RolloutEngine

    tok = build_tokenizer()
    first, second = build_model(tok, SHAPE, seed=1), build_model(tok, SHAPE, seed=2)
    model_dir = save_pretrained(first, tok, tmp_path_factory.mktemp("policy"))
    engine = RolloutEngine(model_dir)
    yield engine, tok, first, second
    engine.close()


def test_sampling_logprobs_match_learner_before_and_after_reload(engine_and_models):
    engine, tok, first, second = engine_and_models
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ["12+34=", "7+80=", "99+99="]]
    outputs = engine.generate(prompts, n=4, temperature=1.0, max_tokens=5, seed=0)
    assert all(len(g.token_ids) == len(g.logprobs) > 0 for gens in outputs for g in gens)
    assert max_mismatch(first, prompts, outputs) <= 1e-3

    publisher = WeightPublisher("test")
    try:
        directory, _ = publisher.publish(second, version=1)
        reload_s = engine.reload_weights(directory)
    finally:
        publisher.close()
    assert reload_s < 30
    outputs = engine.generate(prompts, n=4, temperature=1.0, max_tokens=5, seed=0)
    after = max_mismatch(second, prompts, outputs)
    stale = max_mismatch(first, prompts, outputs)
    assert after <= 1e-3, f"vLLM and learner disagree after reload: {after}"
    assert stale > 1e-2, "the engine still samples from the old weights"


def test_greedy_generation_is_deterministic_and_stops_at_eos(engine_and_models):
    engine, tok, *_ = engine_and_models
    prompts = [tok("5+5=", add_special_tokens=False)["input_ids"]] * 3
    outputs = engine.generate(prompts, n=1, temperature=0.0, max_tokens=8)
    texts = {o[0].text for o in outputs}
    assert len(texts) == 1
    for o in outputs:
        assert o[0].finish_reason in {"stop", "length"}
        assert tok.eos_token_id not in o[0].token_ids[:-1]


def test_prefix_caching_is_on_only_where_a_prompt_can_fill_a_block():
    """Only whole KV blocks are shared: a context no longer than a block cannot hold a cached prompt."""
    from rollouts.engine import CPU_BLOCK_SIZE, CUDA_BLOCK_SIZE, EngineSettings, prefix_caching_pays

    assert not prefix_caching_pays(EngineSettings(max_model_len=64), cuda=False)  # the quickstart's
    assert not prefix_caching_pays(EngineSettings(max_model_len=CPU_BLOCK_SIZE), cuda=False)
    assert prefix_caching_pays(EngineSettings(max_model_len=CPU_BLOCK_SIZE + 1), cuda=False)
    assert prefix_caching_pays(EngineSettings(max_model_len=CUDA_BLOCK_SIZE + 1), cuda=True)
    assert prefix_caching_pays(EngineSettings(max_model_len=64, prefix_caching=True), cuda=False)
    assert not prefix_caching_pays(EngineSettings(max_model_len=512, prefix_caching=False), cuda=True)


def test_a_reload_empties_the_prefix_cache(tmp_path):
    """Prefix caching is on at this context length (a group's samples share the prompt's full KV blocks,
    128 tokens on CPU):
    a prompt longer than a block, generated before a reload, must not be served from blocks computed
    with the old weights afterwards."""
    from rollouts.engine import EngineSettings, RolloutEngine

    tok = build_tokenizer()
    shape = ModelShape(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                       max_positions=256)
    first, second = build_model(tok, shape, seed=1), build_model(tok, shape, seed=2)
    engine = RolloutEngine(save_pretrained(first, tok, tmp_path / "policy"), EngineSettings(max_model_len=256))
    publisher = WeightPublisher("test-prefix")
    try:
        prompts = [tok("1234567890+" * 13 + "5=", add_special_tokens=False)["input_ids"]]
        assert len(prompts[0]) > 128
        assert max_mismatch(first, prompts, engine.generate(prompts, n=2, max_tokens=4, seed=0)) <= 1e-3
        directory, _ = publisher.publish(second, version=1)
        engine.reload_weights(directory)
        assert max_mismatch(second, prompts, engine.generate(prompts, n=2, max_tokens=4, seed=0)) <= 1e-3
    finally:
        publisher.close()
        engine.close()
