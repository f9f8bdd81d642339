"""How cost grows with model size and completion length: generation, learner, weight sync, memory.

    .venv/bin/python -m bench.scaling [--sizes 2M 20M 100M 300M] [--lengths 8 128 512] [--prompts 16]
                                      [--device cpu|cuda] [--out runs/scaling]

For the built-in model (char tokenizer, Qwen2 decoder) at about 2M, 20M, 100M and 300M parameters
(`SIZES`, randomly initialised, float32) and completions of exactly L tokens (`min_tokens` = L, EOS
ignored, so every length is really generated), each measured in a process of its own:

- generation tokens/s: `--prompts` (16) prompts of 16 tokens x 1 sample each, sampled at temperature 1,
  by vLLM (`rollouts.engine.RolloutEngine`) and by transformers `generate` (KV cache, same batch);
  one warm-up call first, then the timed call;
- learner tokens/s: one GRPO update (rlpost's learner: TRL's loss, backward, AdamW) on 2 groups of
  2 completions of L tokens, the second of two updates timed; tokens = completion tokens trained;
- weight sync: the learner publishing the full weights (`WeightPublisher`, safetensors in /dev/shm)
  and vLLM loading them in place (`RolloutEngine.reload_weights`), against a memcpy of the same bytes
  measured in the same process (one `clone` of every tensor) - the floor any sync path pays at least
  once; medians of 3, by bench/sync_breakdown.py's `sync_parts` (which also times the parts);
- peak resident memory (ru_maxrss) of each measuring process: the vLLM engine's, transformers
  generate's, the learner's.

Writes OUT/scaling.json and OUT/scaling.png (tokens/s against parameters, one line per length and
path) and prints the table for docs/benchmarks.md. A size whose parts do not fit a time budget can
be left out with --sizes; nothing is extrapolated.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

PROMPT_TOKENS = 16
# name: (hidden, layers, heads, kv heads, intermediate); parameters printed from the built model
SIZES = {
    "2M": (256, 2, 8, 2, 768),
    "20M": (512, 6, 8, 2, 1536),
    "100M": (768, 14, 12, 4, 2304),
    "300M": (1024, 24, 16, 4, 3072),
    "500M": (1280, 26, 20, 4, 3840),  # bench/gpu_suite.sh's ~0.5B model
}
CPU_SIZES = ("2M", "20M", "100M", "300M")


def build(size: str, max_positions: int, directory: Path) -> tuple[Path, int]:
    from rlpost.modeling import ModelShape, build_model, build_tokenizer, count_parameters, save_pretrained

    hidden, layers, heads, kv, inter = SIZES[size]
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, ModelShape(hidden, layers, heads, kv, inter, max_positions), seed=0)
    return save_pretrained(model, tokenizer, directory), count_parameters(model)


def _prompts(n: int) -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [[rng.randrange(3, 13) for _ in range(PROMPT_TOKENS)] for _ in range(n)]  # digit tokens of the char vocab


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vllm_generation(model_dir: str, length: int, prompts: int, device: str) -> dict:
    from vllm import SamplingParams, TokensPrompt

    from rollouts.engine import EngineSettings, RolloutEngine

    engine = RolloutEngine(model_dir, EngineSettings(max_model_len=PROMPT_TOKENS + length + 8, dtype="float32", seed=0))
    requests = [TokensPrompt(prompt_token_ids=ids) for ids in _prompts(prompts)]

    def run(tokens: int) -> float:
        params = SamplingParams(temperature=1.0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True, seed=0)
        start = time.perf_counter()
        outputs = engine.llm.generate(requests, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == tokens for o in outputs)
        return elapsed

    run(min(length, 8))
    seconds = run(length)
    # weight sync into the running engine: publish the same weights, load them in place
    from bench.sync_breakdown import sync_parts

    sync = sync_parts(engine, model_dir, repeats=3)
    return {"vllm_tokens_per_s": prompts * length / seconds, "vllm_s": seconds, "sync_bytes": sync["bytes"],
            "memcpy_s": sync["memcpy_s"], "publish_s": sync["publish_s"], "reload_s": sync["reload_s"],
            "vllm_peak_rss_mb": peak_rss_mb()}


def hf_generation(model_dir: str, length: int, prompts: int, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    ids = torch.tensor(_prompts(prompts), device=device)

    def run(tokens: int) -> float:
        torch.manual_seed(0)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0)
        elapsed = time.perf_counter() - start
        assert out.shape[1] == PROMPT_TOKENS + tokens
        return elapsed

    run(min(length, 8))
    seconds = run(length)
    return {"hf_tokens_per_s": prompts * length / seconds, "hf_s": seconds, "hf_peak_rss_mb": peak_rss_mb()}


def learner_update(model_dir: str, length: int, prompts: int, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlpost.learners.grpo import GRPOLearner, LearnerSettings
    from rollouts.buffer import RolloutGroup

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as out:
        learner = GRPOLearner(model, tokenizer, LearnerSettings(max_completion_length=length), out, 2)
        g = torch.Generator().manual_seed(0)
        groups = [RolloutGroup(prompt_index=k, prompt="", prompt_ids=ids,
                               completion_ids=[torch.randint(3, 13, (length,), generator=g).tolist() for _ in range(2)],
                               sampling_logprobs=[[-2.3] * length for _ in range(2)], completions=["", ""],
                               rewards=[1.0, 0.0], policy_version=0)
                  for k, ids in enumerate(_prompts(2))]
        learner.step(groups)
        scalars = learner.step(groups)
    return {"learner_tokens_per_s": scalars["train/completion_tokens"] / scalars["train/step_s"],
            "learner_step_s": scalars["train/step_s"], "learner_peak_rss_mb": peak_rss_mb()}


def _child(target, args, queue):
    import torch

    torch.set_num_threads(args[-1])
    queue.put(target(*args[:-1]))


def in_process(target, *args, threads: int) -> dict:
    """`target(*args)` in a spawned process of its own (its own peak memory, no engine left behind)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child, args=(target, (*args, threads), queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for length in sorted({r["length"] for r in rows}):
        part = sorted((r for r in rows if r["length"] == length), key=lambda r: r["parameters"])
        xs = [r["parameters"] / 1e6 for r in part]
        for key, style, label in (("vllm_tokens_per_s", "-o", "vLLM"), ("hf_tokens_per_s", "--s", "transformers"),
                                  ("learner_tokens_per_s", ":^", "learner")):
            ax.plot(xs, [r[key] for r in part], style, label=f"{label}, {length} tokens")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("tokens / s")
    ax.set_title("generation and learner throughput")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(CPU_SIZES), choices=list(SIZES))
    parser.add_argument("--lengths", nargs="+", type=int, default=[8, 128, 512])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each measuring process")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", type=Path, default=Path("runs/scaling"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        model_dir, parameters = build(size, PROMPT_TOKENS + max(args.lengths) + 8, args.out / f"model-{size}")
        for length in args.lengths:
            row = {"size": size, "parameters": parameters, "length": length}
            for part in (vllm_generation, hf_generation, learner_update):
                row |= in_process(part, str(model_dir), length, args.prompts, args.device, threads=args.threads)
            rows.append(row)
            print(json.dumps(row), flush=True)
            (args.out / "scaling.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out / "scaling.png")
    print(f"\n{args.prompts} prompts x 1 sample, {args.threads} thread(s) per process, {args.device}\n")
    print("| model | length | vLLM tok/s | transformers tok/s | vLLM / transformers | learner tok/s | "
          "sync MB | memcpy s | publish s | vLLM reload s | (publish + reload) / memcpy | peak RSS MB: vLLM, "
          "transformers, learner |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} ({r['parameters'] / 1e6:.1f}M) | {r['length']} | {r['vllm_tokens_per_s']:.0f} | "
              f"{r['hf_tokens_per_s']:.0f} | {r['vllm_tokens_per_s'] / r['hf_tokens_per_s']:.2f}x | "
              f"{r['learner_tokens_per_s']:.0f} | {r['sync_bytes'] / 1e6:.1f} | {r['memcpy_s']:.3f} | "
              f"{r['publish_s']:.3f} | {r['reload_s']:.3f} | {(r['publish_s'] + r['reload_s']) / r['memcpy_s']:.1f} | "
              f"{r['vllm_peak_rss_mb']:.0f}, {r['hf_peak_rss_mb']:.0f}, {r['learner_peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
