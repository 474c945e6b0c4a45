"""Each IFEval check on hand-made responses: one that follows the instruction, one that does not."""

import json

import pytest

from qlora_helpers import ifeval

CASES = [
    ("punctuation:no_comma", {}, "No commas here.", "One, two."),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 5},
     "one two three four five", "too short"),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 3}, "two words", "this has four words"),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3},
     "One. Two.", "One. Two. Three."),
    ("keywords:forbidden_words", {"forbidden_words": ["cat", "dog"]}, "A catalog of birds.", "My Dog sleeps."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and **two**", "*only one*"),
    ("keywords:frequency", {"keyword": "moon", "frequency": 2, "relation": "at least"}, "Moon and moon", "moon"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "say hi. Hi!", "Hi! Say hi."),
    ("startend:quotation", {}, '"All quoted."', 'Not "quoted".'),
    ("change_case:english_lowercase", {}, "all lower case.", "Not all lower."),
    ("change_case:english_capital", {}, "ALL CAPS!", "Not caps"),
    ("keywords:existence", {"keywords": ["alpha", "beta"]}, "Alpha then beta.", "Only alpha."),
    ("detectable_format:title", {}, "<<My Title>>\nText", "<<>> no title"),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "Zz top", "z"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", "* one\n* two\n- three"),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name] at [address]", "Dear [name]"),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\nSecond.", "Only one."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     "Done. Any other questions?", "Any other questions? Done."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello.\nP.S. bye", "Hello. PS bye"),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "THE BIG dog", "The BIG dog"),
    ("combination:two_responses", {}, "Answer one.\n******\nAnswer two.", "Same.\n******\nSame."),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "{a: 1}"),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nintro\nSECTION 2\nmore", "SECTION 1\nonly"),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "First part.\n\nThen, the second.", "First part.\n\nAfter that."),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Yes."),
]


@pytest.mark.parametrize("iid,kwargs,good,bad", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_check(iid, kwargs, good, bad):
    assert ifeval.check_response(good, [iid], [kwargs]) == {iid: True}
    assert ifeval.check_response(bad, [iid], [kwargs]) == {iid: False}


@pytest.mark.realdata
def test_every_instruction_in_the_data_is_checked_or_skipped_with_a_reason(data_dir):
    rows = [json.loads(line) for line in (data_dir / "eval/ifeval/input_data.jsonl").read_text().splitlines()]
    ids = {i for r in rows for i in r["instruction_id_list"]}
    assert ids <= set(ifeval.CHECKS) | set(ifeval.SKIPPED)
    assert set(ifeval.SKIPPED) == {"language:response_language"}


def test_score_prompt_and_instruction_level():
    rows = [{"instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"], "kwargs": [{}, {}]},
            {"instruction_id_list": ["punctuation:no_comma", "language:response_language"],
             "kwargs": [{}, {"language": "de"}]}]
    result = ifeval.score(rows, ["fine, but lower", "No comma"])
    assert result["prompts_scored"] == 2 and result["instructions_scored"] == 3
    assert result["prompt_level_strict"] == 0.5  # the first prompt fails its comma rule
    assert result["instruction_level_strict"] == pytest.approx(2 / 3)
    assert result["skipped_instructions"] == {"language:response_language": 1}
