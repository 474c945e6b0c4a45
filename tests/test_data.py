import json

import pytest

from qlora_helpers.config import DataConfig
from qlora_helpers.data import (collate, format_alpaca, heldout_examples, read_records,
                                split_indices, tokenize_pair)
from qlora_helpers.errors import DataError


def test_truncated_json_names_file_and_position(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "c", "out')
    with pytest.raises(DataError, match=r"cut.json: not valid JSON at line 2, column \d+"):
        read_records(path)


def test_jsonl_bad_line_is_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": \n')
    with pytest.raises(DataError, match="rows.jsonl, line 3"):
        read_records(path)


def test_non_utf8_is_named(tmp_path):
    path = tmp_path / "latin.json"
    path.write_bytes('[{"instruction": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(DataError, match="latin.json is not UTF-8"):
        read_records(path)


def test_split_is_deterministic_and_disjoint():
    train, held = split_indices(100, 10, seed=3)
    assert split_indices(100, 10, seed=3) == (train, held)
    assert split_indices(100, 10, seed=4)[1] != held
    assert len(held) == 10 and not set(train) & set(held) and len(train) + len(held) == 100


def test_alpaca_template_with_and_without_input():
    prompt, response = format_alpaca({"instruction": "Add.", "input": "2 and 3", "output": "5"})
    assert "### Input:\n2 and 3" in prompt and prompt.endswith("### Response:\n") and response == "5"
    prompt, _ = format_alpaca({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert "### Input" not in prompt


def test_labels_mask_the_prompt_and_padding(embedded_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    a = tokenize_pair(tok, "Question: 2+2?\nAnswer:", " 4")
    b = tokenize_pair(tok, "Q?", " a longer answer here")
    n_prompt = len(tok("Question: 2+2?\nAnswer:")["input_ids"])
    assert a["labels"][:n_prompt] == [-100] * n_prompt
    assert a["labels"][n_prompt:] == a["input_ids"][n_prompt:] and a["input_ids"][-1] == tok.eos_token_id
    batch = collate([a, b], tok.pad_token_id)
    short = 1 if len(b["input_ids"]) < len(a["input_ids"]) else 0
    pads = batch["attention_mask"][short] == 0
    assert pads.any() and (batch["labels"][short][pads] == -100).all()


def test_heldout_examples_from_the_real_alpaca_sample(data_dir):
    cfg = DataConfig(data_dir=str(data_dir))
    pairs = heldout_examples(cfg, 5)
    assert len(pairs) == 5 and all(p.startswith("Below is an instruction") for p, _ in pairs)
    rows = json.loads((data_dir / cfg.dataset).read_text())
    assert len(rows) == 5000
