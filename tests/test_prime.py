"""PrimeLearner and the prime stage: PRIME's advantages by hand, the online PRM update, process rewards
in the policy gradient, exact checkpoint round trips, recipe keys, and (slow) a real `rlpost run`.

Hand computation of `prime_advantages` (rlpost/learners/prime.py). Groups of K = 3, T = 3, right
padded (P marks padding, whose values must be ignored; X a masked sample's values):

    group 1, all valid:  r_o = (1, 0, 0.5)
        y1 = (0.1, 0.2, 0.3)   |y1| = 3, mean m1 = 0.2
        y2 = (0.4, -0.2, P)    |y2| = 2, mean m2 = 0.1
        y3 = (0.6, P, P)       |y3| = 1, mean m3 = 0.6
      outcome RLOO: 1 - (0 + 0.5)/2 = 0.75,  0 - (1 + 0.5)/2 = -0.75,  0.5 - (1 + 0)/2 = 0
      process baselines: b1 = (m2 + m3)/2 = 0.35, b2 = (m1 + m3)/2 = 0.4, b3 = (m1 + m2)/2 = 0.15
      centred token rewards d = r - b: d1 = (-0.25, -0.15, -0.05), d2 = (0, -0.6), d3 = (0.45)
    group 2, sample 2 masked (reward None):  r_o = (1, X, 0), k = 2
        y4 = (0.2, 0.4, P)  m4 = 0.3;   y5 = X;   y6 = (-0.3, P, P)  m6 = -0.3
      outcome RLOO: 1 - 0 = 1, 0, 0 - 1 = -1;  baselines b4 = m6 = -0.3, b6 = m4 = 0.3
      d4 = (0.5, 0.7), d6 = (-0.6)
    group 3, one valid sample (k = 1): no baseline, A = 0 everywhere.

gamma = 1, c = 1: returns G = suffix sums of d; A = outcome + G
    G1 = (-0.45, -0.2, -0.05)  A1 = (0.3, 0.55, 0.7)
    G2 = (-0.6, -0.6)          A2 = (-1.35, -1.35, 0)
    G3 = (0.45)                A3 = (0.45, 0, 0)
    G4 = (1.2, 0.7)            A4 = (2.2, 1.7, 0)
    G6 = (-0.6)                A6 = (-1.6, 0, 0)
gamma = 0.5, c = 2: G_t = d_t + 0.5 G_{t+1}; A = outcome + 2 G
    G1 = (-0.3375, -0.175, -0.05)  A1 = (0.075, 0.4, 0.65)
    G2 = (-0.3, -0.6)              A2 = (-1.35, -1.95, 0)
    G3 = (0.45)                    A3 = (0.9, 0, 0)
    G4 = (0.85, 0.7)               A4 = (2.7, 2.4, 0)
    G6 = (-0.6)                    A6 = (-2.2, 0, 0)
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from rlpost.errors import UserError
from rlpost.learners.grpo import LearnerSettings
from rlpost.learners.prime import PrimeLearner, PrimeSettings, prime_advantages, process_returns
from rlpost.stages.prime import PrimeStage, check_prime, run_prime
from tests.test_grpo_learner import make_group

P, X = 7.0, 9.0
OUTCOME = [1.0, 0.0, 0.5, 1.0, float("nan"), 0.0, float("nan"), 1.0, float("nan")]
VALID = [True, True, True, True, False, True, False, True, False]
PROCESS = [[0.1, 0.2, 0.3], [0.4, -0.2, P], [0.6, P, P],
           [0.2, 0.4, P], [X, X, X], [-0.3, P, P],
           [X, X, X], [0.5, 0.5, P], [X, X, X]]
MASK = [[1, 1, 1], [1, 1, 0], [1, 0, 0],
        [1, 1, 0], [1, 1, 1], [1, 0, 0],
        [1, 1, 1], [1, 1, 0], [1, 0, 0]]
ZERO = [0.0, 0.0, 0.0]
HAND = {  # (gamma, coef) -> A, from the module docstring
    (1.0, 1.0): [[0.3, 0.55, 0.7], [-1.35, -1.35, 0.0], [0.45, 0.0, 0.0],
                 [2.2, 1.7, 0.0], ZERO, [-1.6, 0.0, 0.0], ZERO, ZERO, ZERO],
    (0.5, 2.0): [[0.075, 0.4, 0.65], [-1.35, -1.95, 0.0], [0.9, 0.0, 0.0],
                 [2.7, 2.4, 0.0], ZERO, [-2.2, 0.0, 0.0], ZERO, ZERO, ZERO],
}


# --------------------------------------------------------------------------- advantages by hand

@pytest.mark.parametrize("gamma, coef", list(HAND))
def test_prime_advantages_match_hand_computation(gamma, coef):
    adv = prime_advantages(torch.tensor(OUTCOME), torch.tensor(PROCESS), torch.tensor(MASK), 3,
                           valid=torch.tensor(VALID), process_reward_coef=coef, gamma=gamma)
    assert adv.shape == (9, 3)
    assert torch.allclose(adv, torch.tensor(HAND[(gamma, coef)]), atol=1e-6), adv


def test_process_returns_alone_and_coefficient_zero():
    """c = 0 leaves the RLOO outcome advantage on every token; G is the process part alone."""
    outcome, process, mask, valid = (torch.tensor(OUTCOME), torch.tensor(PROCESS), torch.tensor(MASK),
                                     torch.tensor(VALID))
    only_outcome = prime_advantages(outcome, process, mask, 3, valid=valid, process_reward_coef=0.0)
    rows = [0.75, -0.75, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0]
    assert torch.allclose(only_outcome, torch.tensor(rows)[:, None] * mask, atol=1e-6)
    g = process_returns(process, mask, 3, valid, gamma=1.0)
    assert torch.allclose(g[0], torch.tensor([-0.45, -0.2, -0.05]), atol=1e-6)
    assert torch.allclose(g[3], torch.tensor([1.2, 0.7, 0.0]), atol=1e-6)
    assert torch.all(g[4] == 0) and torch.all(g[6:] == 0)


# --------------------------------------------------------------------------- the learner

def start_model(make_tiny_model):
    return make_tiny_model(1)


@pytest.fixture
def learner_for(tmp_path, make_tiny_model, tokenizer):
    """A PrimeLearner whose policy, PRM and reference are all copies of the same starting model."""

    def make(group_size: int = 2, beta: float = 0.0, learning_rate: float = 1e-3, **prime) -> PrimeLearner:
        start = start_model(make_tiny_model)
        reference = copy.deepcopy(start)
        return PrimeLearner(copy.deepcopy(start), tokenizer, LearnerSettings(beta=beta, learning_rate=learning_rate),
                            PrimeSettings(**prime), str(tmp_path / "trl"), group_size,
                            prm_model=copy.deepcopy(start), prm_reference=reference,
                            reference_model=reference if beta > 0 else None)

    return make


def labelled_groups(model, tokenizer):
    """Two prompts x 4 samples, rewards 1 / 0 (labels at threshold 0.5), different lengths."""
    return [make_group(model, tokenizer, "12+3=", ["15", "51", "16", "5"], [1.0, 0.0, 0.0, 0.0]),
            make_group(model, tokenizer, "40+2=", ["42", "24", "4", "421"], [1.0, 0.0, 1.0, 0.0])]


def prm_scores(learner, groups) -> torch.Tensor:
    """r(y) per sample with the PRM's current weights."""
    rows = [(g.prompt_ids, c) for g in groups for c in g.completion_ids]
    rewards = learner.process_rewards([p for p, _ in rows], [c for _, c in rows])
    return torch.stack([r.sum() for r in rewards])


def test_prm_update_moves_implicit_rewards_toward_the_labels(learner_for, tokenizer):
    learner = learner_for(group_size=4, prm_learning_rate=1e-2)
    groups = labelled_groups(learner.model, tokenizer)
    labels = torch.tensor([1.0, 0, 0, 0, 1, 0, 1, 0])
    assert torch.all(prm_scores(learner, groups) == 0)  # the PRM starts as its reference
    history = [learner.update_prm(groups) for _ in range(6)]
    losses = [m["train/prm_loss"] for m in history]
    accuracies = [m["train/prm_accuracy"] for m in history]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # r(y) = 0: sigma = 1/2
    assert accuracies[0] == pytest.approx(5 / 8)  # r(y) = 0 predicts 0 everywhere: the 5 negatives
    assert losses[-1] < losses[0] - 0.01 and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert accuracies[-1] > accuracies[0], accuracies
    assert history[0]["train/prm_samples"] == 8 and history[0]["train/prm_label_mean"] == pytest.approx(3 / 8)
    scores = prm_scores(learner, groups)
    assert float(scores[labels == 1].mean()) > 0 > float(scores[labels == 0].mean())
    assert torch.all(learner.model.state_dict()["model.embed_tokens.weight"]
                     == learner.prm_reference.state_dict()["model.embed_tokens.weight"])  # policy untouched


def test_a_masked_sample_never_enters_the_prm_loss(learner_for, tokenizer):
    """A sample with reward None changes neither the PRM loss nor the PRM's update."""
    a, b = learner_for(prm_learning_rate=1e-2), learner_for(prm_learning_rate=1e-2)
    with_masked = [make_group(a.model, tokenizer, "12+3=", ["15", "51"], [1.0, None]),
                   make_group(a.model, tokenizer, "7+8=", ["15", "5"], [1.0, 0.0])]
    without = [make_group(a.model, tokenizer, "12+3=", ["15"], [1.0]),
               make_group(a.model, tokenizer, "7+8=", ["15", "5"], [1.0, 0.0])]
    for _ in range(2):
        ma, mb = a.update_prm(with_masked), b.update_prm(without)
    assert ma["train/prm_samples"] == mb["train/prm_samples"] == 3
    assert ma["train/prm_loss"] == pytest.approx(mb["train/prm_loss"], abs=1e-7)
    pa, pb = a.prm.state_dict(), b.prm.state_dict()
    assert all(torch.allclose(pa[k], pb[k], atol=1e-7) for k in pa)
    assert not all(torch.equal(pa[k], a.prm_reference.state_dict()[k]) for k in pa)  # it did train


def test_all_masked_batch_leaves_the_prm_alone(learner_for, tokenizer):
    learner = learner_for()
    metrics = learner.step([make_group(learner.model, tokenizer, "12+3=", ["15", "5"], [None, float("nan")])])
    assert metrics["train/prm_samples"] == 0 and math.isnan(metrics["train/prm_loss"])
    assert metrics["train/skipped_step"] == 1 and not learner.prm_optimizer.state


@pytest.mark.parametrize("coef", [1.0, 0.0])
def test_process_rewards_reach_the_policy_gradient(learner_for, tokenizer, coef):
    """Rewards equal within each group: every outcome advantage is 0. On the very first step the PRM
    is updated before the process rewards are read (the PRM starts as its reference, so otherwise
    r_t = 0), and then the policy gets a gradient through them; with process_reward_coef = 0 none."""
    learner = learner_for(prm_learning_rate=1e-2, process_reward_coef=coef)
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    groups = [make_group(learner.model, tokenizer, "12+3=", ["15", "51"], [1.0, 1.0]),
              make_group(learner.model, tokenizer, "7+8=", ["5", "511"], [0.0, 0.0])]
    metrics = learner.step(groups)
    assert metrics["train/prm_samples"] == 4 and metrics["train/optimizer_steps"] == 1
    assert metrics["train/process_reward_mean"] != 0  # the updated PRM's rewards
    changed = any(not torch.equal(v, learner.model.state_dict()[k]) for k, v in before.items())
    if coef:
        assert metrics["train/grad_norm"] > 0 and metrics["train/process_advantage_abs_mean"] > 0 and changed
    else:
        assert metrics["train/grad_norm"] == 0 and metrics["train/process_advantage_abs_mean"] == 0
        assert not changed
    for key in ("train/prm_loss", "train/prm_accuracy", "train/loss", "train/entropy", "train/samples"):
        assert key in metrics and math.isfinite(metrics[key]), key


def test_build_inputs_advantages_are_prime_advantages_of_the_prm_rewards(learner_for, tokenizer):
    learner = learner_for(group_size=4, prm_learning_rate=1e-2, gamma=0.9, process_reward_coef=0.5)
    groups = labelled_groups(learner.model, tokenizer)
    learner.update_prm(groups)
    inputs = learner.build_inputs(groups)
    mask = inputs["completion_mask"]
    rows = [(g.prompt_ids, c) for g in groups for c in g.completion_ids]
    rewards = learner.process_rewards([p for p, _ in rows], [c for _, c in rows])
    process = torch.zeros(mask.shape)
    for i, r in enumerate(rewards):
        process[i, : len(r)] = r
    assert torch.allclose(inputs["process_rewards"], process, atol=1e-7)
    expected = prime_advantages(torch.tensor([1.0, 0, 0, 0, 1, 0, 1, 0]), process, mask, 4,
                                process_reward_coef=0.5, gamma=0.9)
    assert inputs["advantages"].shape == mask.shape
    assert torch.allclose(inputs["advantages"], expected, atol=1e-6)
    assert float(inputs["process_advantages"].abs().sum()) > 0


def test_kl_reference_is_shared_with_the_prm(learner_for, tokenizer, make_tiny_model):
    """beta > 0: the frozen reference gets TRL's fused head for the KL term; the PRM still reads its
    plain logits, so r_t is unchanged by the sharing."""
    from rewards.implicit_prm import completion_logprobs

    learner = learner_for(beta=0.05, prm_learning_rate=1e-2)
    assert learner.reference_model is learner.prm_reference
    groups = [make_group(learner.model, tokenizer, "12+3=", ["15", "51"], [1.0, 0.0])]
    learner.update_prm(groups)
    prompts, completions = [groups[0].prompt_ids] * 2, groups[0].completion_ids
    with torch.no_grad():
        unshared = [0.05 * (a - b) for a, b in zip(completion_logprobs(learner.prm, prompts, completions),
                                                    completion_logprobs(start_model(make_tiny_model), prompts,
                                                                        completions))]
    shared = learner.process_rewards(prompts, completions)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(shared, unshared))
    assert float(sum(r.abs().sum() for r in shared)) > 0
    metrics = learner.step(groups)
    assert metrics["train/kl"] >= 0 and math.isfinite(metrics["train/prm_loss"])


def test_extra_state_round_trip_resumes_exactly(learner_for, tokenizer, tmp_path):
    """As run_rl does: save_checkpoint(extra=...), a fresh learner loads it and load_extra_state; its
    next step equals the original's (PRM rewards, PRM weights, policy update). A learner given the
    PRM weights but not the PRM optimiser state diverges: the moments are part of the state."""
    from safetensors.torch import load_file

    from rlpost.checkpoint import RLState, load_checkpoint, save_checkpoint
    from rlpost.loop import EXTRA_STATE

    settings = dict(group_size=4, prm_learning_rate=1e-2)
    trained = learner_for(**settings)
    groups = labelled_groups(trained.model, tokenizer)
    for _ in range(2):
        trained.step(groups)
    state = trained.extra_state()
    assert any(k.startswith("prm.") for k in state)
    assert {"prm_opt.0.exp_avg", "prm_opt.0.exp_avg_sq", "prm_opt.0.step"} <= state.keys()
    assert float(state["prm_opt.0.step"]) == 2
    ckpt = save_checkpoint(tmp_path / "run", trained.model, tokenizer, trained.optimizer, RLState(step=2),
                           extra={EXTRA_STATE: state})

    def resumed(with_optimizer: bool = True):
        fresh = learner_for(**settings)
        load_checkpoint(ckpt, fresh.model, fresh.optimizer)
        extra = load_file(str(ckpt / EXTRA_STATE))
        fresh.load_extra_state(extra if with_optimizer else {k: v for k, v in extra.items() if k.startswith("prm.")})
        return fresh

    fresh, partial = resumed(), resumed(with_optimizer=False)
    restored = fresh.extra_state()
    assert restored.keys() == state.keys() and all(torch.equal(restored[k], state[k]) for k in state)
    assert fresh.prm_optimizer.param_groups[0]["params"][0] is next(fresh.prm.parameters())  # in place
    assert torch.equal(prm_scores(fresh, groups), prm_scores(trained, groups))

    ma, mb, mc = trained.step(groups), fresh.step(groups), partial.step(groups)
    for key in ("train/prm_loss", "train/prm_accuracy", "train/loss", "train/grad_norm",
                "train/process_reward_mean", "train/process_advantage_abs_mean"):
        assert ma[key] == pytest.approx(mb[key], abs=1e-7), key
    assert torch.allclose(prm_scores(fresh, groups), prm_scores(trained, groups), atol=1e-7)
    pa, pb = trained.model.state_dict(), fresh.model.state_dict()
    assert all(torch.allclose(pa[k], pb[k], atol=1e-7) for k in pa)
    assert not torch.allclose(prm_scores(partial, groups), prm_scores(trained, groups), atol=1e-5)

    with pytest.raises(RuntimeError, match="PRM weights"):
        learner_for().load_extra_state({"value_head.weight": torch.zeros(1, 32)})


def test_the_prm_and_the_policy_must_be_separate(tmp_path, make_tiny_model, tokenizer):
    model = make_tiny_model(1)
    with pytest.raises(ValueError, match="separate"):
        PrimeLearner(model, tokenizer, LearnerSettings(), PrimeSettings(), str(tmp_path), 2,
                     prm_model=model, prm_reference=make_tiny_model(1))
    with pytest.raises(ValueError, match="prm_beta"):
        PrimeLearner(model, tokenizer, LearnerSettings(), PrimeSettings(prm_beta=0.0), str(tmp_path), 2,
                     prm_model=make_tiny_model(1), prm_reference=make_tiny_model(1))


# --------------------------------------------------------------------------- the stage

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


def write_recipe(directory: Path, prime: dict | None = None) -> Path:
    """recipes/quickstart.yaml's seed, model, data and eval, with the single stage [prime]."""
    full = yaml.safe_load(QUICKSTART.read_text())
    recipe = {k: full[k] for k in ("seed", "model", "data", "eval")}
    recipe["stages"] = [{"type": "prime", **(prime or {})}]
    path = Path(directory) / "prime.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_prime_is_registered_and_loads_with_its_defaults(tmp_path):
    from rlpost.recipe import load_recipe
    from rlpost.stages import STAGES

    assert STAGES["prime"].config is PrimeStage and STAGES["prime"].check is check_prime
    cfg = load_recipe(write_recipe(tmp_path, {"gamma": 0.9}), ["prime.prm_steps=2"]).prime
    assert (cfg.prm_beta, cfg.prm_learning_rate, cfg.process_reward_coef, cfg.outcome_threshold) == (0.05, 1e-3, 1.0, 0.5)
    assert (cfg.gamma, cfg.prm_steps, cfg.num_generations, cfg.loss_type) == (0.9, 2, 16, "grpo")
    assert not hasattr(cfg, "advantage_estimator")


@pytest.mark.parametrize("override, message", [
    ("prime.prm_beta=0", "'prime.prm_beta' must be a number > 0"),
    ("prime.prm_learning_rate=-1e-5", "'prime.prm_learning_rate' must be a number > 0"),
    ("prime.prm_steps=0", "'prime.prm_steps' must be >= 1"),
    ("prime.process_reward_coef=-1", "'prime.process_reward_coef' must be >= 0"),
    ("prime.gamma=1.5", "'prime.gamma' must be in [0, 1]"),
    ("prime.outcome_threshold=.nan", "'prime.outcome_threshold' must be a finite number"),
    ("prime.num_generations=1", "'prime.num_generations' must be >= 2"),
    ("prime.steps_per_generation=3", "'prime.steps_per_generation' (3) must divide 'prime.prompts_per_step'"),
    ("prime.rewards=[no_such_reward]", "key 'prime.rewards'"),
])
def test_bad_settings_are_refused_naming_the_key(tmp_path, override, message):
    from rlpost.recipe import load_recipe

    with pytest.raises(UserError) as err:
        load_recipe(write_recipe(tmp_path), [override])
    assert f"override '{override}'" in str(err.value) and message in str(err.value), str(err.value)


def test_run_prime_passes_the_keys_to_the_learner(tmp_path, monkeypatch, make_tiny_model, tokenizer):
    import rlpost.loop
    from rlpost.modeling import save_pretrained
    from rlpost.recipe import load_recipe

    class Captured(Exception):
        pass

    def run_rl(policy_dir, run_dir, tok, worker, settings, evaluate=None, progress=None, learner_factory=None,
               dist=None):
        raise Captured(worker, settings, learner_factory)

    monkeypatch.setattr(rlpost.loop, "run_rl", run_rl)
    save_pretrained(make_tiny_model(0), tokenizer, tmp_path / "policy")
    recipe = load_recipe(write_recipe(tmp_path), [
        "prime.num_generations=2", "prime.prm_beta=0.1", "prime.prm_learning_rate=3e-4", "prime.prm_steps=2",
        "prime.process_reward_coef=0.5", "prime.gamma=0.9", "prime.outcome_threshold=0.25", "prime.beta=0.01",
        "prime.loss_type=dr_grpo"])
    ctx = SimpleNamespace(recipe=recipe, name="prime", policy_in=tmp_path / "policy", out_dir=tmp_path / "out",
                          data=SimpleNamespace(prompts=lambda: None, format=None), engine_settings=None,
                          device="cpu", evaluate=None, dist=None)
    with pytest.raises(Captured) as info:
        run_prime(recipe.prime, ctx)
    worker, settings, factory = info.value.args
    assert (worker.group_size, settings.groups_per_step) == (2, 8)
    loaded = []

    def load_reference():
        loaded.append(make_tiny_model(0))
        return loaded[-1]

    learner = factory(make_tiny_model(0), tokenizer, load_reference)
    assert isinstance(learner, PrimeLearner) and len(loaded) == 2
    assert learner.prm in loaded and learner.prm_reference in loaded and learner.prm is not learner.prm_reference
    assert learner.reference_model is learner.prm_reference  # beta > 0: the KL term's reference too
    p, s = learner.prime, learner.settings
    assert (p.prm_beta, p.prm_learning_rate, p.prm_steps, p.process_reward_coef, p.gamma, p.outcome_threshold) == (
        0.1, 3e-4, 2, 0.5, 0.9, 0.25)
    assert (s.beta, s.loss_type) == (0.01, "dr_grpo")
    assert learner.prm_optimizer.param_groups[0]["lr"] == 3e-4


# --------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_rlpost_run_with_a_prime_stage(sft_run, tmp_path):
    """The real CLI: a tiny SFT run reused, then 4 PRIME steps (4 prompts x 4 samples, vLLM rollouts,
    the isolated reward pool; a length reward so that the labels vary). The ledger is contiguous,
    every step logs the PRM's metrics, and checkpoints carry the PRM and its optimiser state."""
    from safetensors.torch import load_file

    from rlpost.loop import EXTRA_STATE
    from tests.spine_helpers import NO_EVAL, copy_sft, quickstart_cmd, run, sft_only_recipe

    run_dir = tmp_path / "run"
    copy_sft(sft_run, run_dir)
    path = sft_only_recipe(tmp_path)
    recipe = yaml.safe_load(path.read_text())
    steps, groups, size = 4, 4, 4
    recipe["stages"].append({
        "type": "prime", "max_steps": steps, "prompts_per_step": groups, "num_generations": size, "save_steps": 2,
        "eval_steps": 4, "reward_workers": 1, "max_staleness": 1, "max_completion_length": 6,
        "outcome_threshold": 0.25,
        "rewards": ["arithmetic_exact", {"name": "tests.reward_fixtures:length_reward", "weight": 0.1}]})
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = run(quickstart_cmd(run_dir, NO_EVAL, recipe=path))  # nothing here reads an evaluation
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage 'sft'" not in result.stdout, "the copied SFT stage was run again"

    ledger = [json.loads(line) for line in (run_dir / "prime" / "ledger.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ledger] == list(range(1, steps + 1))
    assert [i for r in ledger for i in r["prompt_indices"]] == list(range(steps * groups))
    assert [r["samples_trained"] for r in ledger] == [k * groups * size for k in range(1, steps + 1)]
    rows = [json.loads(line) for line in (run_dir / "prime" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "train/prm_loss" in r]
    assert [r["step"] for r in trained] == list(range(1, steps + 1))
    for r in trained:
        for key in ("train/prm_loss", "train/prm_accuracy", "train/process_reward_mean",
                    "train/process_advantage_abs_mean", "train/loss", "train/grad_norm"):
            assert math.isfinite(r[key]), (r["step"], key)
        assert r["train/prm_samples"] == groups * size
    assert trained[0]["train/prm_loss"] == pytest.approx(math.log(2), abs=1e-4)  # the PRM starts as pi_ref
    assert any(r["train/process_reward_mean"] != 0 for r in trained)
    checkpoints = sorted((run_dir / "prime" / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-000002", "step-000004"]
    for ckpt in checkpoints:
        extra = load_file(str(ckpt / EXTRA_STATE))
        assert any(k.startswith("prm.") for k in extra)
        assert int(extra["prm_opt.0.step"]) == int(ckpt.name.split("-")[1])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["points"] == ["initial", "sft", "prime"] and summary["stages"]["prime"]["steps"] == steps
    assert (run_dir / "prime" / "policy" / "model.safetensors").exists()


def test_a_lora_policy_trains_only_its_adapters_while_the_prm_trains_fully(make_tiny_model, tokenizer, tmp_path):
    """The stage's `lora` key wraps the policy only: a step moves the policy's adapters (no base weight)
    and the PRM's own full weights."""
    from rlpost import lora
    from rlpost.lora import LoraSection

    start = start_model(make_tiny_model)
    policy = lora.wrap(copy.deepcopy(start), LoraSection(r=4, alpha=8.0))
    prm = copy.deepcopy(start)
    learner = PrimeLearner(policy, tokenizer, LearnerSettings(learning_rate=1e-2), PrimeSettings(prm_learning_rate=1e-2),
                           str(tmp_path / "trl"), 4, prm_model=prm, prm_reference=copy.deepcopy(start))
    groups = labelled_groups(start, tokenizer)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    prm_before = {k: v.clone() for k, v in prm.state_dict().items()}
    learner.step(groups, fresh=[True] * len(groups))
    moved = {k for k, v in before.items() if not torch.equal(v, policy.state_dict()[k])}
    assert moved and all("lora_" in k for k in moved), sorted(moved)[:5]
    assert any(not torch.equal(v, prm.state_dict()[k]) for k, v in prm_before.items() if "embed" not in k)
