"""The 25 IFEval instruction checkers (strict form), one function each, and their registry.

Every checker is ``check(response, **kwargs) -> bool`` with the kwargs of the IFEval data.
Comparisons: relation "at least" means ``count >= N``, "less than" means ``count < N``.
Keyword and letter matching is case-insensitive. Words, sentences and tokens are measured as the
reference implementation (google-research ``instruction_following_eval``) measures them, with
NLTK (see ``text``). Where a rule departs from the reference, the checker's docstring says so.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from rewards.ifeval import text

RELATIONS = ("at least", "less than")
CONSTRAINED_ANSWERS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def compare(count: int, relation: str, n: int) -> bool:
    """``count >= n`` for "at least", ``count < n`` for "less than"."""
    return count >= n if relation == "at least" else count < n


# --- keywords ---------------------------------------------------------------------------
def keyword_existence(response: str, keywords: list[str]) -> bool:
    """Every keyword occurs in the response (case-insensitive substring)."""
    low = response.lower()
    return all(k.lower() in low for k in keywords)


def keyword_frequency(response: str, keyword: str, frequency: int, relation: str) -> bool:
    """The keyword's case-insensitive occurrence count compares to ``frequency``."""
    count = len(re.findall(re.escape(keyword), response, flags=re.IGNORECASE))
    return compare(count, relation, frequency)


def forbidden_words(response: str, forbidden_words: list[str]) -> bool:
    """No forbidden word occurs as a whole word (case-insensitive)."""
    return not any(
        re.search(rf"\b{re.escape(w)}\b", response, flags=re.IGNORECASE) for w in forbidden_words
    )


def letter_frequency(response: str, letter: str, let_frequency: int, let_relation: str) -> bool:
    """The letter's count in the lowercased response compares to ``let_frequency``.

    As the reference: ``Counter(response.lower())[letter.lower()]``, so "Z" and "z" both count.
    ``letter`` is one character (the verifier strips it and rejects anything longer). Departure:
    the reference replaces a character that is not an ASCII letter (the benchmark asks for "#"
    and "!") by a random letter; here that character itself is counted.
    """
    return compare(Counter(response.lower())[letter.lower()], let_relation, let_frequency)


# --- language and case ------------------------------------------------------------------
def response_language(response: str, language: str) -> bool:
    """langdetect's guess equals ``language``; text it cannot classify fails (the reference passes it)."""
    return text.detect_language(response) == language


def english_capital(response: str) -> bool:
    """All cased letters are capitals and the text is detected as English."""
    return response.isupper() and text.detect_language(response) == "en"


def english_lowercase(response: str) -> bool:
    """All cased letters are lowercase and the text is detected as English."""
    return response.islower() and text.detect_language(response) == "en"


def capital_word_frequency(response: str, capital_frequency: int, capital_relation: str) -> bool:
    """The number of ``nltk.word_tokenize`` tokens that are all capitals (``str.isupper``)
    compares to the target, as the reference ("STATE-OF-THE-ART" and "U.S." are one token each)."""
    capitals = sum(token.isupper() for token in text.word_tokenize(response))
    return compare(capitals, capital_relation, capital_frequency)


# --- length -----------------------------------------------------------------------------
def number_sentences(response: str, num_sentences: int, relation: str) -> bool:
    """The number of Punkt sentences (``nltk.sent_tokenize``) compares to ``num_sentences``."""
    return compare(text.count_sentences(response), relation, num_sentences)


def number_words(response: str, num_words: int, relation: str) -> bool:
    """The word count (``\\w+`` runs, the reference's ``RegexpTokenizer``) compares to ``num_words``."""
    return compare(text.count_words(response), relation, num_words)


def number_paragraphs(response: str, num_paragraphs: int) -> bool:
    """Exactly ``num_paragraphs`` non-empty paragraphs separated by the markdown divider ***."""
    paragraphs = text.split_paragraphs(response, r"\s?\*\*\*\s?")
    return paragraphs is not None and len(paragraphs) == num_paragraphs


def nth_paragraph_first_word(
    response: str, num_paragraphs: int, nth_paragraph: int, first_word: str
) -> bool:
    """Exactly ``num_paragraphs`` paragraphs, and paragraph ``nth_paragraph`` (1-based) starts
    with ``first_word`` (case-insensitive), by the reference's rules:

    - paragraphs are the pieces of ``response.split("\\n\\n")``; blank pieces are not counted,
      yet ``nth_paragraph`` indexes all pieces, and a blank nth piece fails;
    - the first word is the paragraph's first whitespace-separated token with leading ``'``
      then leading ``"`` removed, cut before its first character of ``.,?!'"``: ``"Elm,"``
      gives "elm" and ``Elm's`` "elm", but ``Elm-trees`` stays "elm-trees" and ``**Elm**``
      "**elm**".
    """
    paragraphs = response.split("\n\n")
    count = sum(1 for p in paragraphs if p.strip())
    if not 1 <= nth_paragraph <= count:
        return False
    paragraph = paragraphs[nth_paragraph - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].lstrip("'").lstrip('"')
    head = re.match(r"""[^.,?!'"]*""", word).group(0)
    return count == num_paragraphs and "".join(c.lower() for c in head) == first_word.lower()


# --- detectable content and format ------------------------------------------------------
def number_placeholders(response: str, num_placeholders: int) -> bool:
    """At least ``num_placeholders`` square-bracket placeholders such as [name]."""
    return len(re.findall(r"\[[^\[\]\n]+\]", response)) >= num_placeholders


def postscript(response: str, postscript_marker: str) -> bool:
    """The marker (letters may be separated by one space, case-insensitive) starts a word."""
    letters = [re.escape(c) for c in postscript_marker.strip() if not c.isspace()]
    pattern = r"\b" + r"\s?".join(letters)
    return re.search(pattern, response, flags=re.IGNORECASE) is not None


def number_bullet_lists(response: str, num_bullets: int) -> bool:
    """Exactly ``num_bullets`` markdown bullet lines ("* item" or "- item").

    Tighter than the reference: a space must follow the bullet mark."""
    return len(re.findall(r"^[ \t]*[*-][ \t]+\S", response, flags=re.MULTILINE)) == num_bullets


def constrained_response(response: str) -> bool:
    """The response contains one of the given answer sentences ("My answer is yes." ...)."""
    return any(answer in response for answer in CONSTRAINED_ANSWERS)


def number_highlighted_sections(response: str, num_highlights: int) -> bool:
    """At least ``num_highlights`` non-blank one-line spans in *single* or **double** stars."""
    spans = re.findall(r"\*\*([^\n*]*)\*\*|\*([^\n*]*)\*", response)
    return sum(bool((a or b).strip()) for a, b in spans) >= num_highlights


def multiple_sections(response: str, section_spliter: str, num_sections: int) -> bool:
    """At least ``num_sections`` section headers "<spliter> <number>" (case as given)."""
    headers = re.findall(rf"{re.escape(section_spliter.strip())}\s?\d+", response)
    return len(headers) >= num_sections


def json_format(response: str) -> bool:
    """The whole response (an optional ``` or ```json fence removed) parses as JSON."""
    body = response.strip()
    body = re.sub(r"^```(?:json|JSON|Json)?\s*", "", body)
    body = re.sub(r"\s*```$", "", body)
    try:
        json.loads(body)
    except (ValueError, RecursionError):
        return False
    return True


def title(response: str) -> bool:
    """A title wrapped in double angular brackets, <<like this>>, with non-blank text."""
    return any(t.strip() for t in re.findall(r"<<([^\n]+?)>>", response))


# --- combination, start/end, punctuation ------------------------------------------------
def two_responses(response: str) -> bool:
    """Two different non-empty answers separated by six asterisks ******."""
    parts = text.split_paragraphs(response, r"\*{6}")
    return parts is not None and len(parts) == 2 and parts[0] != parts[1]


def repeat_prompt(response: str, prompt_to_repeat: str) -> bool:
    """The response starts with the request, word for word (case-insensitive)."""
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


def end_checker(response: str, end_phrase: str) -> bool:
    """The response ends with ``end_phrase`` (case-insensitive), nothing after it."""
    return response.strip().lower().endswith(end_phrase.strip().lower())


def quotation(response: str) -> bool:
    """The whole response is wrapped in double quotation marks."""
    body = response.strip()
    return len(body) > 1 and body[0] == '"' and body[-1] == '"'


def no_comma(response: str) -> bool:
    """No comma at all (ASCII "," and the full-width "，"; the reference checks only ",")."""
    return "," not in response and "，" not in response


@dataclass(frozen=True)
class Spec:
    """A checker and the kwargs it takes: name -> "int", "str", "relation", "letter" or "str_list"."""

    check: Callable[..., bool]
    params: dict[str, str]


_NONE: dict[str, str] = {}
CHECKERS: dict[str, Spec] = {
    "keywords:existence": Spec(keyword_existence, {"keywords": "str_list"}),
    "keywords:frequency": Spec(
        keyword_frequency, {"keyword": "str", "frequency": "int", "relation": "relation"}
    ),
    "keywords:forbidden_words": Spec(forbidden_words, {"forbidden_words": "str_list"}),
    "keywords:letter_frequency": Spec(
        letter_frequency, {"letter": "letter", "let_frequency": "int", "let_relation": "relation"}
    ),
    "language:response_language": Spec(response_language, {"language": "str"}),
    "length_constraints:number_sentences": Spec(
        number_sentences, {"num_sentences": "int", "relation": "relation"}
    ),
    "length_constraints:number_paragraphs": Spec(number_paragraphs, {"num_paragraphs": "int"}),
    "length_constraints:number_words": Spec(
        number_words, {"num_words": "int", "relation": "relation"}
    ),
    "length_constraints:nth_paragraph_first_word": Spec(
        nth_paragraph_first_word,
        {"num_paragraphs": "int", "nth_paragraph": "int", "first_word": "str"},
    ),
    "detectable_content:number_placeholders": Spec(
        number_placeholders, {"num_placeholders": "int"}
    ),
    "detectable_content:postscript": Spec(postscript, {"postscript_marker": "str"}),
    "detectable_format:number_bullet_lists": Spec(number_bullet_lists, {"num_bullets": "int"}),
    "detectable_format:constrained_response": Spec(constrained_response, _NONE),
    "detectable_format:number_highlighted_sections": Spec(
        number_highlighted_sections, {"num_highlights": "int"}
    ),
    "detectable_format:multiple_sections": Spec(
        multiple_sections, {"section_spliter": "str", "num_sections": "int"}
    ),
    "detectable_format:json_format": Spec(json_format, _NONE),
    "detectable_format:title": Spec(title, _NONE),
    "combination:two_responses": Spec(two_responses, _NONE),
    "combination:repeat_prompt": Spec(repeat_prompt, {"prompt_to_repeat": "str"}),
    "startend:end_checker": Spec(end_checker, {"end_phrase": "str"}),
    "startend:quotation": Spec(quotation, _NONE),
    "change_case:capital_word_frequency": Spec(
        capital_word_frequency, {"capital_frequency": "int", "capital_relation": "relation"}
    ),
    "change_case:english_capital": Spec(english_capital, _NONE),
    "change_case:english_lowercase": Spec(english_lowercase, _NONE),
    "punctuation:no_comma": Spec(no_comma, _NONE),
}
