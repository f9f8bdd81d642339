"""IFEval (Zhou et al. 2023) instruction-following verifier: 25 checkers, strict and loose.

One checker per instruction id serves both the RL reward (``ifeval_strict_reward``,
``ifeval_loose_reward``) and the benchmark scorer (``check_response``).

The checkers follow the reference implementation (google-research ``instruction_following_eval``)
and measure text as it does, with NLTK: Punkt sentences (``nltk.sent_tokenize``),
``nltk.word_tokenize`` tokens and ``\\w+`` words. NLTK's wheel has no Punkt model
(``nltk.download("punkt_tab")`` fetches them), so the English model's four tables are vendored
in ``data/punkt_tab/english/`` (origin and checksums in ``data/SOURCES.md``) and nothing is
downloaded at run time. Packages that wrap the reference (``if-verifiable``, ``lm-eval``'s
``ifeval`` task) download that data on import, so they are not used. ``langdetect`` (profiles
inside its wheel) decides the language and English-case instructions. Where a rule departs from
the reference implementation, the checker's docstring says so.
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
