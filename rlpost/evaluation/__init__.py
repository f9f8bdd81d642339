"""Evaluation: statistics (CIs, pass@k, maj@k), benchmark loading and decontamination."""

from rlpost.evaluation.benchmarks import (
    Benchmark,
    benchmark_names,
    format_prompt,
    load_benchmark,
    load_user_dataset,
    register_benchmark,
)
from rlpost.evaluation.decontaminate import Overlap, contaminated_indices, find_overlaps
from rlpost.evaluation.metrics import (
    Estimate,
    accuracy,
    bootstrap_interval,
    intervals_overlap,
    maj_at_k,
    pass_at_k,
    wilson_interval,
)

__all__ = [
    "Benchmark", "Estimate", "Overlap", "accuracy", "benchmark_names", "bootstrap_interval",
    "contaminated_indices", "find_overlaps", "format_prompt", "intervals_overlap", "load_benchmark",
    "load_user_dataset", "maj_at_k", "pass_at_k", "register_benchmark", "wilson_interval",
]
