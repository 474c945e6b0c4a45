"""Writes the preference-pair test files under tests/assets/data/preference/ (run it again after editing).

Written for this project, not copied from any data set: one file per hub layout that stage 04b reads
(qlora_helpers/preference_data.py), each with good pairs and a few broken rows that must be dropped
with their reason: prompt/chosen/rejected strings (pairs.jsonl), chosen/rejected message lists
(messages.jsonl), chosen/rejected transcripts with a shared prefix as in Anthropic/hh-rlhf
(transcripts.jsonl).
"""

import json
from pathlib import Path

OUT = Path(__file__).parent / "data" / "preference"

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
            ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Norway", "Oslo"), ("Chile", "Santiago"),
            ("Spain", "Madrid"), ("India", "New Delhi"), ("Ghana", "Accra"), ("Poland", "Warsaw"),
            ("Italy", "Rome"), ("Cuba", "Havana"), ("Nepal", "Kathmandu"), ("Iran", "Tehran"),
            ("Mali", "Bamako"), ("Laos", "Vientiane"), ("Fiji", "Suva"), ("Oman", "Muscat"),
            ("Chad", "N'Djamena"), ("Togo", "Lome"), ("Iraq", "Baghdad"), ("Qatar", "Doha")]
RAMBLE = "Well, that is a question. That is a question. That is a question that is a question."
WRONG = "Atlantis"  # every rejected answer names it: a preference that carries over to held-out pairs


def pairs() -> list[dict]:
    rows = [{"prompt": f"What is the capital of {c}?", "chosen": f"The capital of {c} is {city}.",
             "rejected": f"The capital of {c} is {WRONG}."} for c, city in CAPITALS]
    rows += [{"prompt": "Name a primary colour.", "rejected": "Blue."},                      # missing chosen
             {"prompt": "Say hello.", "chosen": "Hello!", "rejected": "Hello!"},             # identical
             {"prompt": "   ", "chosen": "Yes.", "rejected": "No."}]                          # empty prompt
    return rows


def messages() -> list[dict]:
    rows = []
    for c, city in CAPITALS[:8]:
        ask = [{"role": "system", "content": "Answer briefly."},
               {"role": "user", "content": f"Which city is the capital of {c}?"}]
        rows.append({"chosen": ask + [{"role": "assistant", "content": f"{city}."}],
                     "rejected": ask + [{"role": "assistant", "content": RAMBLE}]})
    ask = [{"role": "user", "content": "Spell 'cat' backwards."}]
    rows.append({"chosen": ask + [{"role": "assistant", "content": "tac"}],             # prompts differ
                 "rejected": [{"role": "user", "content": "Spell 'dog'."}, {"role": "assistant", "content": "dog"}]})
    rows.append({"chosen": ask + [{"role": "assistant", "content": "tac"}],             # identical
                 "rejected": ask + [{"role": "assistant", "content": "tac"}]})
    return rows


def transcripts() -> list[dict]:
    rows = []
    for c, city in CAPITALS[:8]:
        prefix = (f"\n\nHuman: I am planning a trip to {c}.\n\nAssistant: That sounds lovely. How can I help?"
                  f"\n\nHuman: What is its capital?\n\nAssistant:")
        rows.append({"chosen": f"{prefix} The capital of {c} is {city}.", "rejected": f"{prefix} {RAMBLE}"})
    rows.append({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!"})                       # missing rejected
    rows.append({"chosen": "no turns here", "rejected": "none here either"})           # not a transcript
    return rows


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in (("pairs", pairs()), ("messages", messages()), ("transcripts", transcripts())):
        with open(OUT / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
