"""Writes the tests' own small data set under tests/assets/data/ (run it again after editing).

Written for this project, not copied from any data set: instruction/response records in the Alpaca
layout, GSM8K-style word problems ending "#### N", IFEval-style prompts with instruction ids the
checks in qlora_helpers/ifeval.py implement, and a few AlpacaEval / MT-bench style prompts. The
smoke profile (configs/smoke.yaml) and every end-to-end test run on these, so a bare clone of the
repository runs every CPU test.
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).parent / "data"

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
            ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Norway", "Oslo"), ("Chile", "Santiago"),
            ("Spain", "Madrid"), ("India", "New Delhi"), ("Ghana", "Accra"), ("Poland", "Warsaw")]
OPPOSITES = [("hot", "cold"), ("early", "late"), ("full", "empty"), ("loud", "quiet"), ("rough", "smooth"),
             ("heavy", "light"), ("open", "closed"), ("wide", "narrow"), ("sharp", "dull"), ("brave", "afraid"),
             ("ancient", "modern"), ("generous", "stingy")]
WORDS = ["planet", "garden", "silver", "window", "bridge", "candle", "forest", "marble", "rocket", "pepper",
         "violin", "anchor"]


def instructions(rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for country, city in CAPITALS:
        rows.append({"instruction": f"What is the capital of {country}?", "input": "",
                     "output": f"The capital of {country} is {city}."})
    for word, opposite in OPPOSITES:
        rows.append({"instruction": "Give the opposite of the word below.", "input": word,
                     "output": f"The opposite of \"{word}\" is \"{opposite}\"."})
    for word in WORDS:
        rows.append({"instruction": "Write the word below backwards.", "input": word,
                     "output": word[::-1]})
        rows.append({"instruction": f"How many letters are in the word \"{word}\"?", "input": "",
                     "output": f"The word \"{word}\" has {len(word)} letters."})
    for _ in range(24):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        rows.append({"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} + {b} = {a + b}."})
    for _ in range(12):
        nums = rng.sample(range(1, 100), 5)
        rows.append({"instruction": "Sort these numbers from smallest to largest.",
                     "input": ", ".join(map(str, nums)), "output": ", ".join(map(str, sorted(nums)))})
    for _ in range(12):
        km = rng.randint(1, 40)
        rows.append({"instruction": f"Convert {km} kilometres to metres.", "input": "",
                     "output": f"{km} kilometres is {km * 1000} metres."})
    rng.shuffle(rows)
    return rows


def word_problems(rng: random.Random, n: int) -> list[dict[str, str]]:
    rows = []
    for _ in range(n):
        boxes, per_box, eaten = rng.randint(2, 9), rng.randint(3, 12), rng.randint(1, 5)
        total = boxes * per_box
        rows.append({
            "question": f"Mia buys {boxes} boxes of pencils with {per_box} pencils in each box. "
                        f"She gives away {eaten} pencils. How many pencils does she have left?",
            "answer": f"Mia buys {boxes} * {per_box} = <<{boxes}*{per_box}={total}>>{total} pencils.\n"
                      f"She has {total} - {eaten} = <<{total}-{eaten}={total - eaten}>>{total - eaten} left.\n"
                      f"#### {total - eaten}"})
    return rows


IFEVAL = [
    ("Describe a sunrise without using any commas.", ["punctuation:no_comma"], [{}]),
    ("Write a short note to a friend in all lowercase letters.", ["change_case:english_lowercase"], [{}]),
    ("List three fruits as a markdown bullet list with exactly 3 bullets.",
     ["detectable_format:number_bullet_lists"], [{"num_bullets": 3}]),
    ("Explain what a river is in fewer than 40 words.", ["length_constraints:number_words"],
     [{"relation": "less than", "num_words": 40}]),
    ("Write a haiku about snow and wrap the whole answer in double quotation marks.",
     ["startend:quotation"], [{}]),
    ("Give a title in double angular brackets, like <<title>>, then one sentence about tea.",
     ["detectable_format:title"], [{}]),
    ("Describe a cat. Do not use the words dog or bark.", ["keywords:forbidden_words"],
     [{"forbidden_words": ["dog", "bark"]}]),
    ("Write two sentences about the sea and end with a postscript starting with P.S.",
     ["detectable_content:postscript"], [{"postscript_marker": "P.S."}]),
]

SHOWCASE = ["Suggest a name for a small bakery.", "Explain why the sky is blue in one sentence.",
            "Write a two-line poem about autumn.", "Give one tip for learning a new language."]
MT_BENCH = [("writing", ["Write a short welcome message for a library.", "Now make it more formal."]),
            ("reasoning", ["If all cats are animals and Tom is a cat, what is Tom?", "Explain your reasoning."]),
            ("math", ["What is 12 times 11?", "Now divide that by 4."]),
            ("coding", ["Write a Python function that returns the larger of two numbers.", "Add a docstring."])]


def write_json(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main() -> None:
    rng = random.Random(7)
    write_json(OUT / "instructions.json", instructions(rng))
    write_jsonl(OUT / "gsm8k" / "train.jsonl", word_problems(rng, 6))
    write_jsonl(OUT / "gsm8k" / "test.jsonl", word_problems(rng, 6))
    write_jsonl(OUT / "ifeval.jsonl", [{"key": i, "prompt": p, "instruction_id_list": ids, "kwargs": kw}
                                       for i, (p, ids, kw) in enumerate(IFEVAL)])
    write_json(OUT / "alpaca_eval.json", [{"instruction": p, "output": "", "generator": "none", "dataset": "tests"}
                                          for p in SHOWCASE])
    write_jsonl(OUT / "mt_bench.jsonl", [{"question_id": i, "category": c, "turns": t}
                                         for i, (c, t) in enumerate(MT_BENCH, 81)])


if __name__ == "__main__":
    main()
