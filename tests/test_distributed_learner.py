"""The GRPO learner under accelerate: 2 CPU processes (DDP, gloo) take the same update as 1 process.

`test_two_processes_take_the_single_process_update` launches this file with
`accelerate launch --config_file recipes/accelerate/ddp_cpu.yaml` (2 processes). Each process builds
the same tiny Qwen2 from the same seed, rank 0 builds a fixed batch (8 groups of 4; fixed prompts,
completions of 1-6 tokens, fixed rewards with a masked sample, a group with equal rewards and a group
with one valid reward; fixed sampling logprobs, so the sampler importance weights vary and some are
capped) and broadcasts it (`Context.broadcast_groups`), and each rank's `GRPOLearner.step` trains on
its shard. The test then takes the same step on the same batch in this process without an
accelerator and compares rank 0's updated parameters and (clipped) gradients with it, for the loss
types whose normalisation the sharding must get right (grpo: per-sequence means; dapo and cispo: the
whole batch's token count; bnpo: the rescaled per-rank token mean; dr_grpo; luspo at sequence level)
and with several optimiser
steps per batch (steps_per_generation 2 x num_iterations 2, where the clip binds) with a KL term.

Run by hand for the timing of the quickstart shape (8 prompts x 16 samples, hidden 256, 2 layers):
    accelerate launch --config_file recipes/accelerate/ddp_cpu.yaml tests/test_distributed_learner.py bench OUT
    python tests/test_distributed_learner.py bench OUT
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DDP_CPU = REPO / "recipes" / "accelerate" / "ddp_cpu.yaml"
TINY = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
QUICKSTART = dict(hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2, intermediate_size=768)
COMMON = dict(learning_rate=1e-2, max_grad_norm=0.02, max_completion_length=8, importance_cap=2.0, epsilon=0.1)
CONFIGS = {
    "grpo": dict(loss_type="grpo"),
    "dapo": dict(loss_type="dapo"),
    "bnpo": dict(loss_type="bnpo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "cispo": dict(loss_type="cispo", epsilon_high=5.0),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "dapo_s2_mu2": dict(loss_type="dapo", steps_per_generation=2, num_iterations=2),
    "grpo_kl_s2_mu2": dict(loss_type="grpo", beta=0.05, steps_per_generation=2, num_iterations=2),
}
GROUPS, GROUP_SIZE = 8, 4


def fixed_batch(tokenizer, groups: int = GROUPS, size: int = GROUP_SIZE, seed: int = 0, max_len: int = 6):
    """A fixed batch of RolloutGroups (see the module docstring); independent of any model."""
    import torch

    from rollouts.buffer import RolloutGroup

    g = torch.Generator().manual_seed(seed)
    digits = tokenizer("0123456789+=")["input_ids"]
    batch = []
    for i in range(groups):
        prompt = [digits[int(k)] for k in torch.randint(len(digits), (int(torch.randint(3, 7, (1,), generator=g)),),
                                                         generator=g)]
        completions, logps = [], []
        for _ in range(size):
            n = int(torch.randint(1, max_len + 1, (1,), generator=g))
            completions.append([digits[int(k)] for k in torch.randint(10, (n,), generator=g)])
            logps.append([-float(x) for x in torch.empty(n).uniform_(0.5, 3.0, generator=g)])
        rewards = [float(r) for r in torch.randint(0, 3, (size,), generator=g) / 2]
        if i == 1:
            rewards[2] = None  # masked sample
        if i == 2:
            rewards = [0.5] * size  # equal rewards: zero advantages, tokens still counted
        if i == 5:
            rewards = [1.0] + [None] * (size - 1)  # one valid reward: no baseline, no trainable token
        batch.append(RolloutGroup(prompt_index=i, prompt="", prompt_ids=prompt, completion_ids=completions,
                                  sampling_logprobs=logps, completions=[""] * size, rewards=rewards,
                                  policy_version=0))
    return batch


def run_configs(out_dir: Path, accelerator=None, names=tuple(CONFIGS)) -> None:
    """One GRPOLearner step per config on `fixed_batch`, each from a fresh model of seed 1; writes
    `<name>.rank<r>.pt` (parameters, gradients, scalars) to `out_dir`."""
    import torch

    from rlpost.distributed import Context
    from rlpost.learners.grpo import GRPOLearner, LearnerSettings
    from rlpost.modeling import ModelShape, build_model, build_tokenizer

    ctx = Context(accelerator)
    tokenizer = build_tokenizer()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        settings = LearnerSettings(**COMMON, **CONFIGS[name])
        model = build_model(tokenizer, ModelShape(**TINY), seed=1)
        reference = build_model(tokenizer, ModelShape(**TINY), seed=1) if settings.beta > 0 else None
        learner = GRPOLearner(model, tokenizer, settings, str(out_dir / f"trl-{ctx.rank}"), GROUP_SIZE,
                              reference_model=reference, accelerator=accelerator)
        groups = ctx.broadcast_groups(fixed_batch(tokenizer) if ctx.is_main else None)
        refused = ""
        if ctx.world_size > 1:
            try:  # 8 - S groups divide by S = steps_per_generation, not by S x 2: refused before any update
                learner.step(groups[:GROUPS - settings.steps_per_generation])
            except ValueError as error:
                refused = str(error)
        scalars = learner.step(groups)
        torch.save({"params": {k: p.detach().clone() for k, p in learner.model.named_parameters()},
                    "grads": {k: p.grad.detach().clone() for k, p in learner.model.named_parameters()
                              if p.grad is not None},
                    "scalars": scalars, "refused": refused, "world": ctx.world_size},
                   out_dir / f"{name}.rank{ctx.rank}.pt")


def nonfinite_on_one_rank(out_dir: Path, accelerator) -> None:
    """A finite step, then a step whose loss is NaN on the last rank only: every rank must skip it
    (collective decision in `apply_update`), leaving parameters and optimiser state as they were."""
    import copy

    import torch

    from rlpost.distributed import Context
    from rlpost.learners.grpo import GRPOLearner, LearnerSettings
    from rlpost.modeling import ModelShape, build_model, build_tokenizer

    ctx = Context(accelerator)
    tokenizer = build_tokenizer()
    learner = GRPOLearner(build_model(tokenizer, ModelShape(**TINY), seed=1), tokenizer,
                          LearnerSettings(**COMMON), str(out_dir / f"trl-{ctx.rank}"), GROUP_SIZE,
                          accelerator=accelerator)
    groups = ctx.broadcast_groups(fixed_batch(tokenizer) if ctx.is_main else None)
    learner.step(groups)
    before = {k: p.detach().clone() for k, p in learner.model.named_parameters()}
    state = copy.deepcopy(learner.optimizer.state_dict())
    if ctx.rank == ctx.world_size - 1:
        original = learner.trainer.compute_loss
        learner.trainer.compute_loss = lambda model, inputs: original(model, inputs) * float("nan")
    scalars = learner.step(groups)
    unchanged = all(torch.equal(before[k], p) for k, p in learner.model.named_parameters())
    torch.save({"scalars": scalars, "unchanged": unchanged,
                "optimizer_unchanged": str(state) == str(learner.optimizer.state_dict())},
               out_dir / f"nonfinite.rank{ctx.rank}.pt")


def bench(out_dir: Path, accelerator=None, repeats: int = 5) -> None:
    """Learner step time on the quickstart shape: 8 prompts x 16 samples, completions of 1-6 tokens."""
    import torch

    from rlpost.distributed import Context
    from rlpost.learners.grpo import GRPOLearner, LearnerSettings
    from rlpost.modeling import ModelShape, build_model, build_tokenizer

    ctx = Context(accelerator)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, ModelShape(**QUICKSTART), seed=1)
    learner = GRPOLearner(model, tokenizer, LearnerSettings(learning_rate=1e-4, max_completion_length=6),
                          str(out_dir / f"trl-{ctx.rank}"), 16, accelerator=accelerator)
    groups = ctx.broadcast_groups(fixed_batch(tokenizer, groups=8, size=16) if ctx.is_main else None)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        ctx.barrier()
        start = time.perf_counter()
        scalars = learner.step(groups)
        ctx.barrier()
        times.append(time.perf_counter() - start)
    if ctx.is_main:
        result = {"world": ctx.world_size, "threads": torch.get_num_threads(), "step_s": times[1:],
                  "median_s": sorted(times[1:])[len(times[1:]) // 2], "samples": scalars["train/samples"]}
        print(json.dumps(result), flush=True)
        (out_dir / f"bench-world{ctx.world_size}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out_dir: Path, mode: str = "configs") -> subprocess.Popen:
    """`accelerate launch --config_file recipes/accelerate/ddp_cpu.yaml this_file mode out_dir`, started."""
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    cmd = [str(accelerate), "launch", "--config_file", str(DDP_CPU), "--main_process_port", str(_free_port()),
           str(Path(__file__)), mode, str(out_dir)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: a timeout ends the workers too


def _max_rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.fixture(scope="module")
def two_and_one(tmp_path_factory):
    """(per config: rank 0's result, rank 1's, the single process's)."""
    import torch

    root = tmp_path_factory.mktemp("ddp")
    process = _launch(root / "two")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_configs(root / "one")  # the single-process reference, while the two processes start up
        stdout, stderr = process.communicate(timeout=300)
    except BaseException:  # a failure or the timeout: end the launcher and its workers
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    finally:
        torch.set_num_threads(threads)
    assert process.returncode == 0, (stdout[-3000:], stderr[-6000:])
    load = lambda path: torch.load(path, weights_only=False)  # noqa: E731
    results = {name: (load(root / "two" / f"{name}.rank0.pt"), load(root / "two" / f"{name}.rank1.pt"),
                      load(root / "one" / f"{name}.rank0.pt")) for name in CONFIGS}
    results["nonfinite"] = tuple(load(root / "two" / f"nonfinite.rank{r}.pt") for r in (0, 1))
    return results


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_processes_take_the_single_process_update(two_and_one, name):
    import torch

    rank0, rank1, single = two_and_one[name]
    assert rank0["world"] == rank1["world"] == 2 and single["world"] == 1
    assert rank0["params"].keys() == single["params"].keys() == rank1["params"].keys()
    # the ranks hold the same replica, bit for bit
    for key in rank0["params"]:
        assert torch.equal(rank0["params"][key], rank1["params"][key]), key
    # the update equals the single-process one within float tolerance
    param_diff = max(float((rank0["params"][k] - single["params"][k]).abs().max()) for k in single["params"])
    grad_rel = max(_max_rel(rank0["grads"][k], single["grads"][k]) for k in single["grads"])
    print(f"{name}: max |param diff| {param_diff:.3e}, max relative grad diff {grad_rel:.3e}")
    assert rank0["grads"].keys() == single["grads"].keys()
    assert grad_rel < 1e-5, grad_rel
    # AdamW's step m / (sqrt(v) + eps) is sensitive where |g| ~ eps = 1e-8 (the largest differences are
    # at such elements), so the parameters are held to 1% of one step (lr) per element
    assert param_diff < 1e-2 * COMMON["learning_rate"], param_diff
    s2, s1 = rank0["scalars"], single["scalars"]
    for key in ("train/optimizer_steps", "train/samples", "train/trained_samples", "train/masked_samples",
                "train/masked_groups", "train/completion_tokens", "train/nonfinite_updates"):
        assert s2[key] == s1[key], (key, s2[key], s1[key])
    compared = [k for k in s1 if k in ("train/loss", "train/grad_norm", "train/entropy", "train/kl")
                or k.startswith(("train/clip_ratio/", "train/cispo_clip_ratio"))]
    assert len(compared) >= 4, compared  # TRL's metrics are gathered over the ranks
    for key in compared:
        assert s2[key] == pytest.approx(s1[key], rel=1e-5, abs=1e-7), key
    assert s1["train/grad_norm"] > COMMON["max_grad_norm"]  # the clip binds: on the all-reduced gradient
    # 8 - S groups do not shard over 2 processes: refused, clearly, on both ranks, before any update
    assert "do not split evenly over 2 processes" in rank0["refused"] and rank1["refused"] == rank0["refused"]


def test_a_nan_loss_on_one_rank_skips_the_update_on_every_rank(two_and_one):
    for rank in two_and_one["nonfinite"]:
        assert rank["unchanged"] and rank["optimizer_unchanged"]
        assert rank["scalars"]["train/nonfinite_updates"] == 1.0 and rank["scalars"]["train/nonfinite_step"] == 1.0
        assert rank["scalars"]["train/optimizer_steps"] == 0.0


def test_an_accelerator_of_one_process_changes_nothing(tmp_path):
    """`accelerator.prepare` on one process (no wrapper; an AcceleratedOptimizer) takes the plain update."""
    import torch
    from accelerate import Accelerator

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_configs(tmp_path / "plain", names=("dapo",))
        run_configs(tmp_path / "accelerated", Accelerator(cpu=True), names=("dapo",))
    finally:
        torch.set_num_threads(threads)
    plain, accelerated = (torch.load(tmp_path / d / "dapo.rank0.pt", weights_only=False)
                          for d in ("plain", "accelerated"))
    for key, value in plain["params"].items():
        assert torch.equal(value, accelerated["params"][key]), key
    assert plain["scalars"]["train/loss"] == accelerated["scalars"]["train/loss"]


def test_shard_groups_layout_and_refusal():
    from rlpost.distributed import shard_groups

    groups = list(range(8))
    assert shard_groups(groups, 0, 2) == [0, 1, 2, 3] and shard_groups(groups, 1, 2) == [4, 5, 6, 7]
    # with 2 mini-batches each rank takes its half of each: its k-th mini-batch is in the single process's k-th
    assert shard_groups(groups, 0, 2, parts=2) == [0, 1, 4, 5]
    assert shard_groups(groups, 1, 2, parts=2) == [2, 3, 6, 7]
    assert shard_groups(groups, 0, 1, parts=2) == groups
    with pytest.raises(ValueError, match="divisible by 4"):
        shard_groups(groups[:6], 0, 2, parts=2)
    with pytest.raises(ValueError, match="rank"):
        shard_groups(groups, 2, 2)


def test_single_process_context_is_inert(tokenizer):
    from rlpost.distributed import Context

    ctx = Context.from_env()
    assert ctx.accelerator is None and ctx.world_size == 1 and ctx.is_main and ctx.rank == 0
    batch = fixed_batch(tokenizer)
    assert ctx.broadcast_groups(batch) == batch and ctx.broadcast_groups(None) is None
    assert ctx.shard(batch) == batch


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes == 2
    head = " ".join(line for line in path.read_text().splitlines()[:3] if line.startswith("#"))
    assert ("NOT RUN HERE" not in head and "RUN HERE" in head) == (path.name == "ddp_cpu.yaml"), head
    expected = {"ddp_cpu.yaml": "MULTI_GPU", "ddp_gpu.yaml": "MULTI_GPU", "fsdp2.yaml": "FSDP",
                "deepspeed_zero2.yaml": "DEEPSPEED", "deepspeed_zero3.yaml": "DEEPSPEED"}[path.name]
    assert str(config.distributed_type).endswith(expected)
    if path.name == "fsdp2.yaml":
        assert config.fsdp_config["fsdp_version"] == 2
    if path.name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(path.stem[-1])


if __name__ == "__main__":  # a launched process: `mode out_dir`
    sys.path.insert(0, str(REPO))
    import torch

    from rlpost.distributed import Context

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    mode, out = sys.argv[1], Path(sys.argv[2])
    context = Context.from_env(cpu=True)
    if mode == "bench":
        bench(out, context.accelerator)
    else:
        run_configs(out, context.accelerator)
        nonfinite_on_one_rank(out, context.accelerator)
    context.barrier()
