"""IFEval (Zhou et al. 2023) instruction-following verifier: 25 checkers, strict and loose.

One checker per instruction id serves both the RL reward (``ifeval_strict_reward``,
``ifeval_loose_reward``) and the benchmark scorer (``check_response``).

Why these checkers are written here rather than taken from a package (checked 2026-11):
- ``if-verifiable`` 0.1.2 (PyPI): its IFEval sentence count loads NLTK's ``punkt`` model and
  its capital-word count calls ``nltk.word_tokenize`` (``punkt_tab``); neither is shipped in a
  wheel, and its IFBench module calls ``nltk.download`` on import. Not usable without a
  run-time download.
- ``lm-eval`` (``lm_eval.tasks.ifeval``): the same NLTK ``punkt``/``punkt_tab`` data, downloaded
  on import, plus a heavy stack (evaluate, scikit-learn, sacrebleu, rouge-score).
So the 25 checkers are written for this project from the paper's instruction descriptions,
with only ``langdetect`` (a small pure-Python PyPI package with its profiles inside) for the
language and English-case instructions, and a regex sentence splitter instead of NLTK.
Where a rule departs from the reference implementation, the checker's docstring says so.
"""

from rewards.ifeval.reward import ifeval_loose_reward, ifeval_strict_reward
from rewards.ifeval.verifier import (
    SUPPORTED_IDS,
    IFEvalResult,
    check_instruction,
    check_response,
    loose_variants,
)

__all__ = [
    "SUPPORTED_IDS",
    "IFEvalResult",
    "check_instruction",
    "check_response",
    "ifeval_loose_reward",
    "ifeval_strict_reward",
    "loose_variants",
]
