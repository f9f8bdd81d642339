"""IFEval checkers: one complying and one violating response per instruction type, loose vs
strict, NLTK's measurements where a naive splitter differs, the 541 benchmark rows' kwargs,
errors, and the TRL reward functions."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from rewards.ifeval import (
    SUPPORTED_IDS,
    check_instruction,
    check_response,
    ifeval_loose_reward,
    ifeval_strict_reward,
    loose_variants,
)
from rewards.ifeval.text import (
    PUNKT_ENGLISH,
    count_sentences,
    count_words,
    split_sentences,
    word_tokenize,
)
from rlpost.errors import UserError
from rlpost.evaluation.benchmarks import vendored_path

EN = "The quick brown fox jumps over the lazy dog while the farmer watches from the old barn"
DE = "Der schnelle braune Fuchs springt über den faulen Hund, während der Bauer aus der Scheune zusieht"

# (instruction id, kwargs, response, expected strict outcome)
CASES = [
    ("keywords:existence", {"keywords": ["cat", "Moon"]}, "The Cat sat under the moon.", True),
    ("keywords:existence", {"keywords": ["cat", "moon"]}, "The cat sat under the sun.", False),
    ("keywords:frequency", {"keyword": "tea", "frequency": 2, "relation": "at least"},
     "Tea first, then more TEA.", True),
    ("keywords:frequency", {"keyword": "tea", "frequency": 2, "relation": "at least"},
     "Only one tea here.", False),
    ("keywords:frequency", {"keyword": "tea", "frequency": 2, "relation": "less than"},
     "Only one tea here.", True),
    ("keywords:frequency", {"keyword": "tea", "frequency": 2, "relation": "less than"},
     "tea tea", False),
    ("keywords:forbidden_words", {"forbidden_words": ["run", "bark"]},
     "The dog was running and barking.", True),
    ("keywords:forbidden_words", {"forbidden_words": ["run", "bark"]},
     "Dogs Bark at night.", False),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "at least"},
     "Zig zag zoo", True),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "at least"},
     "Zig zag", False),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "less than"},
     "Zig zag", True),
    # Counter(response.lower()): capitals count too (a case-sensitive count of "a" here is 1)
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 3, "let_relation": "at least"},
     "AAa", True),
    ("keywords:letter_frequency", {"letter": "A", "let_frequency": 3, "let_relation": "less than"},
     "Banana", False),
    # a non-letter is counted as given (the benchmark asks for 4 "#"; the reference draws a
    # random letter instead)
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 4, "let_relation": "at least"},
     "#a #b #c #d", True),
    ("language:response_language", {"language": "de"}, DE, True),
    ("language:response_language", {"language": "de"}, EN, False),
    ("language:response_language", {"language": "de"}, "12345 !!!", False),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "Dr. Smith arrived at 3.30 p.m. today. He left!", True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "One. Two? Three!", False),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"},
     "One. Two? Three!", True),
    # "e.g." is not in Punkt's English abbreviations: 3 sentences (a splitter that knows it: 2)
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"},
     "We use tools, e.g. hammers. They work.", True),
    # no break after "..." before "What" (seen capitalised mid-sentence, not a sentence
    # starter): 2 sentences (a split at every "..." gives 3)
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "Wait... What happened? Nothing.", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2},
     "First part.\n***\nSecond part.", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2},
     "First part.\n***\n***\nSecond part.", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "Only one part.", False),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"},
     "one two three four five", True),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"},
     "one two three four", False),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"},
     "one two three four", True),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "elm"},
     "Trees are tall.\n\n\"Elm, the best tree.\"\n\nThe end.", True),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "elm"},
     "Trees are tall.\n\nOak is the best tree.\n\nThe end.", False),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "elm"},
     "Trees are tall.\n\nElm is the best tree.", False),
    # first word = first whitespace token, quotes lstripped, cut at the first of .,?!'"
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "Elm"},
     "'Elm's bark,' she said.\n\nThe end.", True),
    ("length_constraints:nth_paragraph_first_word",  # "elm-trees" (a \w+ word would be "elm")
     {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "elm"},
     "Elm-trees grow.\n\nThe end.", False),
    ("length_constraints:nth_paragraph_first_word",  # "elm:" -- a colon is not cut
     {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "elm"},
     "Elm: the tree.\n\nThe end.", False),
    # paragraphs are split at "\n\n" only: "\n \n" does not separate two
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "elm"},
     "Trees.\n \nElm grows.\n\nThe end.", False),
    # blank pieces are not counted but are indexed: piece 2 of "A\n\n\n\nElm..." is blank
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "elm"},
     "Trees.\n\n\n\nElm grows.\n\nThe end.", False),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "elm"},
     "Trees.\n\n\nElm grows.\n\nThe end.", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], see you at [address].", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], see you soon.", False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     "Main text.\n\np.s. do not forget.", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Main text, no note.", False),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"},
     "Text.\nP. P. S. one more thing", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2},
     "Items:\n* apples\n- pears\n", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2},
     "Items:\n* apples\n* pears\n* plums", False),
    ("detectable_format:constrained_response", {}, "I think so. My answer is yes.", True),
    ("detectable_format:constrained_response", {}, "Yes, definitely.", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "See *part one* and **part two**.", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "See *part one* and ** ** only.", False),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nIntro.\nSECTION 2\nBody.", True),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nIntro and body.", False),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', True),
    ("detectable_format:json_format", {}, 'Here is JSON: {"a": 1}', False),
    ("detectable_format:title", {}, "<<A Poem of Joy>>\nRoses are red.", True),
    ("detectable_format:title", {}, "A Poem of Joy\nRoses are red. << >>", False),
    ("combination:two_responses", {}, "Answer one.\n******\nAnswer two.", True),
    ("combination:two_responses", {}, "Answer one.\n******\nAnswer one.", False),
    ("combination:two_responses", {}, "Answer one.\n******\n******\nAnswer two.", False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem about cats."},
     "Write a poem about cats. Cats purr softly.", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem about cats."},
     "Sure! Write a poem about cats. Cats purr.", False),
    ("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"},
     "Done. Is there anything else I can help with?\n", True),
    ("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"},
     "Is there anything else I can help with? Bye.", False),
    ("startend:quotation", {}, '"Wrapped in quotes."', True),
    ("startend:quotation", {}, '"Opened but not closed.', False),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "This is VERY STATE-OF-THE-ART work.", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "This is VERY good work.", False),
    ("change_case:capital_word_frequency",
     {"capital_frequency": 2, "capital_relation": "less than"}, "This is VERY good work.", True),
    # nltk.word_tokenize keeps "U.S." whole: 2 capital words (\w+ words: "U", "S", "UK" = 3)
    ("change_case:capital_word_frequency",
     {"capital_frequency": 3, "capital_relation": "less than"}, "The U.S. and the UK agree.", True),
    ("change_case:english_capital", {}, EN.upper(), True),
    ("change_case:english_capital", {}, EN, False),
    ("change_case:english_capital", {}, DE.upper(), False),
    ("change_case:english_lowercase", {}, EN.lower(), True),
    ("change_case:english_lowercase", {}, EN, False),
    ("change_case:english_lowercase", {}, DE.lower(), False),
    ("punctuation:no_comma", {}, "No commas in this text.", True),
    ("punctuation:no_comma", {}, "Well, there is one.", False),
    ("punctuation:no_comma", {}, "全角逗号，也算", False),
]


def _case_id(case: tuple) -> str:
    return f"{case[0]}-{'pass' if case[3] else 'fail'}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_checker_table(case: tuple) -> None:
    instruction_id, kwargs, response, expected = case
    assert check_instruction(instruction_id, kwargs, response, prompt="") is expected


def test_table_covers_every_id_both_ways() -> None:
    for outcome in (True, False):
        assert {c[0] for c in CASES if c[3] is outcome} == SUPPORTED_IDS


def _rows() -> list[dict]:
    with vendored_path("ifeval/input_data.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_supported_ids_equal_the_benchmark_ids() -> None:
    rows = _rows()
    assert len(rows) == 541
    found = {i for row in rows for i in row["instruction_id_list"]}
    assert found == SUPPORTED_IDS
    assert len(SUPPORTED_IDS) == 25


def test_every_benchmark_row_is_accepted() -> None:
    for row in _rows():
        result = check_response(
            row["instruction_id_list"], row["kwargs"], "A short dummy answer. Two.", row["prompt"]
        )
        n = len(row["instruction_id_list"])
        assert len(result.strict) == len(result.loose) == n
        assert all(isinstance(x, bool) for x in result.strict + result.loose)
        assert result.prompt_strict == all(result.strict)
        assert all(s <= l for s, l in zip(result.strict, result.loose))


def test_null_kwargs_are_dropped() -> None:
    kwargs = {"num_words": 3, "relation": "at least", "keyword": None, "language": None}
    assert check_instruction("length_constraints:number_words", kwargs, "a b c", "")
    assert check_instruction("punctuation:no_comma", {"keyword": None}, "no comma", "")


def test_repeat_prompt_falls_back_to_the_prompt() -> None:
    assert check_instruction("combination:repeat_prompt", {}, "Say hi. Hi!", prompt="Say hi.")
    assert not check_instruction("combination:repeat_prompt", {}, "Hi!", prompt="Say hi.")


def test_unknown_id_raises_user_error_naming_it() -> None:
    with pytest.raises(UserError, match="punctuation:no_semicolon"):
        check_instruction("punctuation:no_semicolon", {}, "text", "")


@pytest.mark.parametrize(
    "instruction_id,kwargs,match",
    [
        ("length_constraints:number_words", {"num_words": 3}, "relation"),
        ("length_constraints:number_words", {"num_words": 3, "relation": "most"}, "relation"),
        ("length_constraints:number_words", {"num_words": "3", "relation": "at least"}, "num_words"),
        ("punctuation:no_comma", {"keyword": "x"}, "keyword"),
        ("keywords:existence", {"keywords": "cat"}, "keywords"),
        ("keywords:letter_frequency", {"letter": "ab", "let_frequency": 1, "let_relation": "at least"},
         "letter"),
        ("keywords:letter_frequency", {"letter": " ", "let_frequency": 1, "let_relation": "at least"},
         "letter"),
    ],
)
def test_bad_kwargs_raise_user_error(instruction_id: str, kwargs: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        check_instruction(instruction_id, kwargs, "text", "")


def test_loose_variants_are_the_papers_eight() -> None:
    variants = loose_variants("Sure!\n*body*\nBye")
    assert variants == [
        "Sure!\n*body*\nBye", "*body*\nBye", "Sure!\n*body*", "*body*",
        "Sure!\nbody\nBye", "body\nBye", "Sure!\nbody", "body",
    ]


@pytest.mark.parametrize(
    "instruction_id,kwargs,response",
    [
        # a chatty first line breaks "wrap everything in quotes"; loose drops that line
        ("startend:quotation", {}, 'Here you go:\n"The whole answer."'),
        # a sign-off after the requested ending; loose drops the last line
        ("startend:end_checker", {"end_phrase": "Any other questions?"},
         "Answer.\nAny other questions?\nCheers"),
        # markdown bold around the required sentence; loose removes the stars
        ("detectable_format:constrained_response", {}, "**My answer is yes**."),
        # JSON with a preamble and a closing remark
        ("detectable_format:json_format", {}, 'JSON:\n{"a": 1}\nHope this helps'),
        # a bold first word is "**elm**" strictly; loose removes the stars
        ("length_constraints:nth_paragraph_first_word",
         {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "elm"}, "**Elm** grows.\n\nThe end."),
    ],
)
def test_loose_passes_where_strict_fails(instruction_id: str, kwargs: dict, response: str) -> None:
    result = check_response([instruction_id], [kwargs], response, "")
    assert result.strict == [False] and result.loose == [True]
    assert not result.prompt_strict and result.prompt_loose


def test_loose_ignores_blank_variants() -> None:
    # strict fails (the response has words); the only non-blank variant is the response itself
    result = check_response(
        ["length_constraints:number_words"], [{"num_words": 1, "relation": "less than"}], "word", ""
    )
    assert result.strict == [False] and result.loose == [False]


def test_prompt_level_needs_every_instruction() -> None:
    ids = ["punctuation:no_comma", "startend:quotation"]
    result = check_response(ids, [{}, {}], '"No commas here."', "")
    assert result.prompt_strict and result.strict == [True, True]
    result = check_response(ids, [{}, {}], "No commas here.", "")
    assert result.strict == [True, False] and not result.prompt_strict


def test_mismatched_row_lengths_raise() -> None:
    with pytest.raises(UserError, match="2 instruction ids but 1 kwargs"):
        check_response(["punctuation:no_comma", "startend:quotation"], [{}], "x", "")


def test_text_measurements_hand_counted() -> None:
    assert count_words("Don't stop-now, 42 times!") == 6  # don t stop now 42 times
    # nltk.word_tokenize: Treebank splits the clitic and the punctuation, keeps the hyphenated word
    assert word_tokenize("Don't stop-now, 42 times!") == ["Do", "n't", "stop-now", ",", "42", "times", "!"]
    # Punkt: "Mr." is a known abbreviation, "3.50" one word; "?" ends a sentence even before
    # lowercase "she"; the blank line ends none; "e.g." (not in the model) ends one
    sentences = split_sentences('Mr. Lee paid $3.50. "Why?" she asked!\n\nA heading\nNext e.g. this')
    assert sentences == ["Mr. Lee paid $3.50.", '"Why?"', "she asked!", "A heading\nNext e.g.", "this"]
    assert count_sentences("... !!! ") == 4  # "...", "!", "!", "!"
    assert count_sentences(" \n ") == 0


@pytest.mark.parametrize(
    "text,expected",
    [
        # "dr" is an abbreviation and "smith" not a sentence starter; "3.5" has no final period
        ("Dr. Smith paid 3.5 dollars. He left.", ["Dr. Smith paid 3.5 dollars.", "He left."]),
        # "u.s" is an abbreviation and lowercase "economy" follows
        ("The U.S. economy grew. It was fast.", ["The U.S. economy grew.", "It was fast."]),
        # "e.g" is not an abbreviation of the English model
        ("We use tools, e.g. hammers. They work.", ["We use tools, e.g.", "hammers.", "They work."]),
        # after "...": "What" is no sentence start (seen capitalised mid-sentence), "They" is one
        ("Wait... What happened? Nothing.", ["Wait... What happened?", "Nothing."]),
        ("Wait... They left.", ["Wait...", "They left."]),
        # the closing quote stays with its sentence
        ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
    ],
)
def test_sentences_are_punkts(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


def test_vendored_punkt_tables_match_their_sources_note() -> None:
    sources = (PUNKT_ENGLISH.parents[1] / "SOURCES.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\S+) \| .* \| (\d+) \| ([0-9a-f]{64}) \|$", sources, flags=re.MULTILINE)
    assert sorted(name for name, _, _ in rows) == sorted(p.name for p in PUNKT_ENGLISH.iterdir())
    for name, entries, sha256 in rows:
        data = (PUNKT_ENGLISH / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha256, name
        assert data.count(b"\n") == int(entries), name


def test_tokenizers_equal_nltks_with_the_vendored_model(tmp_path, monkeypatch) -> None:
    """nltk.sent_tokenize / nltk.word_tokenize, given the vendored tables as their punkt_tab
    data, split every response of the table exactly as ours do."""
    nltk = pytest.importorskip("nltk")
    model = tmp_path / "tokenizers" / "punkt_tab" / "english"
    model.mkdir(parents=True)
    for table in PUNKT_ENGLISH.iterdir():
        (model / table.name).write_bytes(table.read_bytes())
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    cached = getattr(nltk.tokenize, "_get_punkt_tokenizer", None)  # NLTK caches the model it loads
    clear = getattr(cached, "cache_clear", lambda: None)
    clear()
    try:
        try:
            nltk.sent_tokenize("Hello.")
        except LookupError as exc:  # this NLTK version names the table files differently
            pytest.skip(f"NLTK's punkt_tab reader wants other file names: {exc}")
        for _, _, response, _ in CASES:
            assert split_sentences(response) == nltk.sent_tokenize(response)
            assert word_tokenize(response) == nltk.word_tokenize(response)
    finally:
        clear()


def test_blank_response_follows_no_instruction() -> None:
    assert not check_instruction("punctuation:no_comma", {}, " \n ", "")
    result = check_response(["length_constraints:number_words"], [{"num_words": 5, "relation": "less than"}],
                            "", "")
    assert result.strict == [False] and result.loose == [False]


def test_rewards_are_the_fraction_followed() -> None:
    ids = [["punctuation:no_comma", "startend:quotation"], ["startend:quotation"], None]
    kwargs = [[{}, {"unused": None}], [None], None]
    completions = ["No commas here.", 'Sure:\n"quoted"', "anything"]
    prompts = ["p1", "p2", "p3"]
    strict = ifeval_strict_reward(prompts, completions, instruction_id_list=ids, kwargs=kwargs)
    loose = ifeval_loose_reward(prompts, completions, instruction_id_list=ids, kwargs=kwargs)
    assert strict == [0.5, 0.0, None]
    assert loose == [0.5, 1.0, None]


def test_reward_accepts_chat_messages_and_extra_columns() -> None:
    prompts = [[{"role": "user", "content": "Repeat me."}]]
    completions = [[{"role": "assistant", "content": "Repeat me. Done"}]]
    rewards = ifeval_strict_reward(
        prompts, completions, completion_ids=[[1, 2]],
        instruction_id_list=[["combination:repeat_prompt"]], kwargs=[[{}]], key=[7],
    )
    assert rewards == [1.0]


def test_reward_length_mismatch_raises() -> None:
    with pytest.raises(UserError, match="2 completions but 1"):
        ifeval_strict_reward(["a", "b"], ["x", "y"], instruction_id_list=[["punctuation:no_comma"]],
                             kwargs=[[{}]])


def test_pathological_inputs_stay_fast() -> None:
    long_run = "x" * 200_000 + ". " + "a." * 50_000
    assert isinstance(count_sentences(long_run), int)
    assert not check_instruction("detectable_format:json_format", {}, "[" * 100_000, "")
