"""Text measurements the IFEval checkers share, taken as the reference implementation takes them.

The reference (google-research ``instruction_following_eval``) measures text with NLTK; so do
these functions, with NLTK's pretrained English Punkt model read from the ``punkt_tab`` files
vendored in ``data/punkt_tab/english/`` (origin in ``data/SOURCES.md``), so nothing is
downloaded at run time.

- word (``count_words``): a maximal run of word characters, regex ``\\w+`` -- the reference's
  ``nltk.tokenize.RegexpTokenizer(r"\\w+")`` ("don't" is two words, "e-mail" two).
- sentence (``split_sentences``): NLTK's Punkt sentence tokenizer with the English model, as
  ``nltk.sent_tokenize``. A word-final period after a known abbreviation ("Dr.", "U.S.", but
  not "e.g." or "etc.") or an ellipsis ends a sentence only if the model's orthographic
  statistics say the next word starts one; any other word-final period ends one, except that
  after an initial ("J."), a number ("1.") or in a known collocation the next word decides too;
  "3.5" has no word-final period; "!" and "?" followed by a space or punctuation end one; line
  breaks and blank lines end none.
- token (``word_tokenize``): ``nltk.word_tokenize``: Punkt sentences, then NLTK's improved
  Treebank word tokenizer on each ("don't" -> "do", "n't"; "U.S." and "STATE-OF-THE-ART" stay
  whole; punctuation marks are tokens of their own).
- language: ``langdetect`` with a fixed seed (its default is random), best guess only.
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from pathlib import Path

from langdetect import DetectorFactory, detect
from langdetect.lang_detect_exception import LangDetectException
from nltk.tokenize import NLTKWordTokenizer
from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

DetectorFactory.seed = 0

PUNKT_ENGLISH = Path(__file__).resolve().parent / "data" / "punkt_tab" / "english"
_WORD = re.compile(r"\w+")
_TREEBANK = NLTKWordTokenizer()


def _lines(name: str) -> list[str]:
    """Lines of a vendored Punkt table file, each without its newline (nothing else is stripped)."""
    lines = (PUNKT_ENGLISH / name).read_text(encoding="utf-8").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


@functools.cache
def punkt_english() -> PunktSentenceTokenizer:
    """NLTK's Punkt sentence tokenizer with the English ``punkt_tab`` model (the one
    ``nltk.sent_tokenize`` loads), built from the vendored tables."""
    params = PunktParameters()
    params.abbrev_types = set(_lines("abbrev_types.txt"))
    params.sent_starters = set(_lines("sent_starters.txt"))
    params.collocations = {tuple(line.split("\t")) for line in _lines("collocations.tab")}
    params.ortho_context = defaultdict(
        int, {typ: int(flags) for typ, flags in (line.split("\t") for line in _lines("ortho_context.tab"))}
    )
    return PunktSentenceTokenizer(params)


def count_words(text: str) -> int:
    """Number of ``\\w+`` runs in ``text``."""
    return len(_WORD.findall(text))


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` by Punkt with the English model (``nltk.sent_tokenize(text)``)."""
    return punkt_english().tokenize(text)


def count_sentences(text: str) -> int:
    """Number of Punkt sentences in ``text``."""
    return len(split_sentences(text))


def word_tokenize(text: str) -> list[str]:
    """Tokens of ``text`` as ``nltk.word_tokenize(text)`` gives them."""
    return [token for sentence in split_sentences(text) for token in _TREEBANK.tokenize(sentence)]


def split_paragraphs(text: str, divider: str) -> list[str] | None:
    """Paragraphs of ``text`` cut at ``divider`` (a regex), stripped.

    Empty pieces at the very start or end are dropped; an empty piece between two dividers
    means the layout is broken and the result is None.
    """
    pieces = [p.strip() for p in re.split(divider, text)]
    while pieces and not pieces[0]:
        pieces.pop(0)
    while pieces and not pieces[-1]:
        pieces.pop()
    if any(not p for p in pieces):
        return None
    return pieces


def detect_language(text: str) -> str | None:
    """ISO 639-1 code of ``text``'s language by ``langdetect``, None if it cannot tell."""
    try:
        return detect(text)
    except LangDetectException:
        return None
