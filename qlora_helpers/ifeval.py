"""IFEval-style verifiable instructions (Zhou et al. 2023), the checks that need no downloads.

Each check takes the response and the instruction's kwargs from the IFEval data file and returns
whether the response follows it, with the semantics of the reference implementation
(google-research `instruction_following_eval`, strict mode). Skipped, and why:

- `language:response_language`: needs langdetect's language profiles.

`length_constraints:number_sentences` splits sentences with a regular expression (the reference
uses its own regex splitter with more abbreviation rules), so it can differ on text full of
abbreviations. `change_case:english_*` check the case only (the reference also runs langdetect).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from .errors import DataError

SKIPPED = {"language:response_language": "needs langdetect's downloaded language profiles"}


def _compare(count: int, relation: str, target: int) -> bool:
    if relation == "less than":
        return count < target
    if relation == "at least":
        return count >= target
    raise DataError(f"IFEval kwargs name an unknown relation {relation!r}; valid: 'less than', 'at least'.")


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def _sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])", text.strip())
    return [p for p in parts if p.strip()]


def no_comma(r: str, kw: dict) -> bool:
    return "," not in r


def number_words(r: str, kw: dict) -> bool:
    return _compare(len(_words(r)), kw["relation"], kw["num_words"])


def number_sentences(r: str, kw: dict) -> bool:
    return _compare(len(_sentences(r)), kw["relation"], kw["num_sentences"])


def forbidden_words(r: str, kw: dict) -> bool:
    return not any(re.search(r"\b" + re.escape(w) + r"\b", r, flags=re.IGNORECASE) for w in kw["forbidden_words"])


def highlighted_sections(r: str, kw: dict) -> bool:
    single = [h for h in re.findall(r"\*[^\n\*]*\*", r) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", r) if h.removeprefix("**").removesuffix("**").strip()]
    return len(single) + len(double) >= kw["num_highlights"]


def keyword_frequency(r: str, kw: dict) -> bool:
    count = len(re.findall(re.escape(kw["keyword"]), r, flags=re.IGNORECASE))
    return _compare(count, kw["relation"], kw["frequency"])


def repeat_prompt(r: str, kw: dict) -> bool:
    return r.strip().lower().startswith(kw["prompt_to_repeat"].strip().lower())


def quotation(r: str, kw: dict) -> bool:
    r = r.strip()
    return len(r) > 1 and r[0] == '"' and r[-1] == '"'


def lowercase(r: str, kw: dict) -> bool:
    return r == r.lower()


def capital(r: str, kw: dict) -> bool:
    return r == r.upper()


def keywords_exist(r: str, kw: dict) -> bool:
    return all(re.search(re.escape(k), r, flags=re.IGNORECASE) for k in kw["keywords"])


def title(r: str, kw: dict) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", r))


def letter_frequency(r: str, kw: dict) -> bool:
    return _compare(r.lower().count(kw["letter"].lower()), kw["let_relation"], kw["let_frequency"])


def bullet_lists(r: str, kw: dict) -> bool:
    stars = re.findall(r"^\s*\*[^\*].*$", r, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", r, flags=re.MULTILINE)
    return len(stars) + len(dashes) == kw["num_bullets"]


def placeholders(r: str, kw: dict) -> bool:
    return len(re.findall(r"\[.*?\]", r)) >= kw["num_placeholders"]


def paragraphs(r: str, kw: dict) -> bool:
    parts = re.split(r"\s?\*\*\*\s?", r)
    if any(not p.strip() for i, p in enumerate(parts) if 0 < i < len(parts) - 1):
        return False
    return len([p for p in parts if p.strip()]) == kw["num_paragraphs"]


def end_checker(r: str, kw: dict) -> bool:
    return r.strip().lower().endswith(kw["end_phrase"].strip().lower())


def postscript(r: str, kw: dict) -> bool:
    marker = kw["postscript_marker"].strip().lower()
    if marker == "p.p.s":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "p.s.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker) + r".*$"
    return bool(re.findall(pattern, r.lower(), flags=re.MULTILINE))


def capital_word_frequency(r: str, kw: dict) -> bool:
    count = sum(1 for w in _words(r) if w.isupper())
    return _compare(count, kw["capital_relation"], kw["capital_frequency"])


def two_responses(r: str, kw: dict) -> bool:
    parts = [p.strip() for p in r.split("******")]
    return len(parts) == 2 and all(parts) and parts[0] != parts[1]


def json_format(r: str, kw: dict) -> bool:
    text = r.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        text = text.removeprefix(fence)
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def multiple_sections(r: str, kw: dict) -> bool:
    sections = re.split(r"\s?" + re.escape(kw["section_spliter"]) + r"\s?\d+\s?", r)
    return len(sections) - 1 >= kw["num_sections"]


def nth_paragraph_first_word(r: str, kw: dict) -> bool:
    parts = [p for p in re.split(r"\n\n", r) if p.strip()]
    if len(parts) != kw["num_paragraphs"] or kw["nth_paragraph"] > len(parts):
        return False
    words = parts[kw["nth_paragraph"] - 1].strip().split()
    first = words[0].lstrip("'\"").rstrip(".,!?;:'\"").lower() if words else ""
    return first == kw["first_word"].lower()


def constrained_response(r: str, kw: dict) -> bool:
    return any(option in r for option in ("My answer is yes.", "My answer is no.", "My answer is maybe."))


CHECKS: dict[str, Callable[[str, dict], bool]] = {
    "punctuation:no_comma": no_comma,
    "length_constraints:number_words": number_words,
    "length_constraints:number_sentences": number_sentences,
    "keywords:forbidden_words": forbidden_words,
    "detectable_format:number_highlighted_sections": highlighted_sections,
    "keywords:frequency": keyword_frequency,
    "combination:repeat_prompt": repeat_prompt,
    "startend:quotation": quotation,
    "change_case:english_lowercase": lowercase,
    "keywords:existence": keywords_exist,
    "detectable_format:title": title,
    "keywords:letter_frequency": letter_frequency,
    "detectable_format:number_bullet_lists": bullet_lists,
    "detectable_content:number_placeholders": placeholders,
    "length_constraints:number_paragraphs": paragraphs,
    "startend:end_checker": end_checker,
    "detectable_content:postscript": postscript,
    "change_case:english_capital": capital,
    "change_case:capital_word_frequency": capital_word_frequency,
    "combination:two_responses": two_responses,
    "detectable_format:json_format": json_format,
    "detectable_format:multiple_sections": multiple_sections,
    "length_constraints:nth_paragraph_first_word": nth_paragraph_first_word,
    "detectable_format:constrained_response": constrained_response,
}


def check_response(response: str, instruction_ids: list[str], kwargs: list[dict]) -> dict[str, bool]:
    """{instruction id: followed?} for the implemented instructions of one prompt."""
    results = {}
    for iid, kw in zip(instruction_ids, kwargs):
        if iid in CHECKS:
            clean = {k: v for k, v in (kw or {}).items() if v is not None}
            results[iid] = CHECKS[iid](response, clean)
    return results


def score(rows: list[dict[str, Any]], responses: list[str]) -> dict[str, Any]:
    """Prompt-level (every implemented instruction followed) and instruction-level accuracy."""
    prompt_hits, instruction_hits, instructions, scored, skipped = 0, 0, 0, 0, {}
    per_prompt = []  # [all followed, instructions followed, instructions] of each scored prompt
    for row, response in zip(rows, responses):
        result = check_response(response, row["instruction_id_list"], row["kwargs"])
        for iid in row["instruction_id_list"]:
            if iid not in CHECKS:
                skipped[iid] = skipped.get(iid, 0) + 1
        if not result:
            continue
        scored += 1
        prompt_hits += all(result.values())
        instruction_hits += sum(result.values())
        instructions += len(result)
        per_prompt.append([int(all(result.values())), sum(result.values()), len(result)])
    return {"prompt_level_strict": prompt_hits / scored if scored else 0.0,
            "instruction_level_strict": instruction_hits / instructions if instructions else 0.0,
            "prompts_scored": scored, "instructions_scored": instructions,
            "skipped_instructions": skipped, "skipped_why": SKIPPED, "per_prompt": per_prompt}
