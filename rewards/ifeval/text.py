"""Text measurements the IFEval checkers share: words, sentences, paragraphs, language.

Definitions (written for this project; no NLTK, so nothing is downloaded at run time):

- word: a maximal run of word characters, regex ``\\w+`` ("don't" is two words, "e-mail" two).
- sentence: text is cut at a run of ``.``, ``!`` or ``?`` (optionally followed by closing
  quotes or brackets) that is followed by whitespace or the end, and at blank lines. A period
  does not end a sentence after a common abbreviation ("Dr.", "e.g.", "etc.") or a single-letter
  initial ("J."), and "3.5" is never cut because no whitespace follows the period. Pieces with
  no letter or digit are not sentences.
- language: ``langdetect`` with a fixed seed (its default is random), best guess only.
"""

from __future__ import annotations

import re

from langdetect import DetectorFactory, detect
from langdetect.lang_detect_exception import LangDetectException

DetectorFactory.seed = 0

_WORD = re.compile(r"\w+")
_HAS_ALNUM = re.compile(r"[^\W_]")
# A sentence end: terminator run, optional closing quotes/brackets, then whitespace or end.
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e inc ltd co corp no fig approx dept est "
    "jan feb mar apr jun jul aug sep sept oct nov dec u.s u.k a.m p.m ph.d".split()
)


def count_words(text: str) -> int:
    """Number of ``\\w+`` runs in ``text``."""
    return len(_WORD.findall(text))


def _ends_with_abbreviation(chunk: str) -> bool:
    """True when the period closing ``chunk`` belongs to an abbreviation or an initial."""
    tokens = chunk.rsplit(None, 1)
    if not tokens:
        return False
    token = tokens[-1].lstrip("(\"'“‘[").lower()
    if not token.endswith("."):
        return False
    stem = token[:-1]
    return stem in _ABBREVIATIONS or (len(stem) == 1 and stem.isalpha())


def _split_block(block: str) -> list[str]:
    """Sentences of one block of text that has no blank line in it."""
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(block):
        piece = block[start : match.end()]
        if match.group(0) == "." and _ends_with_abbreviation(piece):
            continue
        sentences.append(piece.strip())
        start = match.end()
    sentences.append(block[start:].strip())
    return sentences


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (see the module docstring for the rules)."""
    pieces = [s for block in _BLANK_LINE.split(text) for s in _split_block(block)]
    return [s for s in pieces if _HAS_ALNUM.search(s)]


def count_sentences(text: str) -> int:
    """Number of sentences in ``text``."""
    return len(split_sentences(text))


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
