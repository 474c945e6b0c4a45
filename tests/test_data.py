import csv
import json
import shutil
import socket

import pytest
import torch

from qlora_helpers.batching import collate_packed, pack_examples, padding_efficiency
from qlora_helpers.config import DataConfig, SourceConfig, load_config
from qlora_helpers.data import dropped_table
from qlora_helpers.errors import DataError
from qlora_helpers.opening import setup_run
from qlora_helpers.paths import PROJECT_ROOT
from qlora_helpers.prepared import heldout_pairs, load_split, prepare_data
from qlora_helpers.prompts import BadConversation, encode_pairs, format_alpaca, render_conversation
from qlora_helpers.runs import RunFolder
from qlora_helpers.scoring import collate
from qlora_helpers.sources import DataUnavailable, load_source, read_records
from tests.data_fixtures import ROWS, _cfg, _write_json, tok  # noqa: F401 - tok: a fixture

ASSETS = PROJECT_ROOT / "tests" / "assets" / "data"


# --- bad input, each named -----------------------------------------------------------------------


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
    path.write_bytes('[{"instruction": "x"},\n{"instruction": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(DataError, match="latin.json is not UTF-8 text \\(line 2"):
        read_records(path)


def test_wrong_columns_name_them_and_the_formats(tmp_path, tok):
    _write_json(tmp_path / "odd.json", [{"question": "q", "reply": "r"}])
    with pytest.raises(DataError) as err:
        prepare_data(_cfg(tmp_path, SourceConfig(path="odd.json")), tok, 256, 4)
    msg = str(err.value)
    assert "['question', 'reply']" in msg and "alpaca: instruction, output" in msg and "columns" in msg


def test_column_mapping_fixes_them(tmp_path, tok):
    rows = [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(10)]
    _write_json(tmp_path / "qa.json", rows)
    src = SourceConfig(path="qa.json", columns={"instruction": "question", "output": "answer"})
    prepared = prepare_data(_cfg(tmp_path, src, eval_size=2), tok, 256, 4)
    assert prepared.report["sources"]["qa"]["format"] == "alpaca" and prepared.report["kept"] == 10


def test_bad_rows_are_dropped_by_reason_with_examples(tmp_path, tok):
    rows = ROWS[:20] + [
        {"instruction": "", "output": "x"},                      # empty
        {"output": "no instruction"},                            # missing
        {"instruction": 5, "output": "x"},                       # not a string
        dict(ROWS[0]),                                           # duplicate
        {"instruction": "long", "output": "word " * 1_000_000},  # a row of a million+ characters
    ]
    _write_json(tmp_path / "mixed.json", rows)
    prepared = prepare_data(_cfg(tmp_path, SourceConfig(path="mixed.json"), eval_size=2), tok, 256, 4)
    report = prepared.report
    assert report["dropped"] == {"empty_field": 1, "missing_field": 1, "not_a_string": 1,
                                 "duplicate": 1, "too_long": 1}
    assert report["kept"] == 20
    assert report["dropped_examples"]["not_a_string"][0]["row"] == 23
    assert "'instruction' is int" in report["dropped_examples"]["not_a_string"][0]["detail"]


def test_truncate_mode_counts_truncations(tmp_path, tok):
    rows = ROWS[:10] + [{"instruction": "long", "output": "word " * 500}]
    _write_json(tmp_path / "t.json", rows)
    prepared = prepare_data(_cfg(tmp_path, SourceConfig(path="t.json"), eval_size=2, too_long="truncate"),
                            tok, 128, 4)
    assert prepared.report["truncated"] == 1 and prepared.report["kept"] == 11
    assert max(len(e["input_ids"]) for e in prepared.train + prepared.eval) == 128


def test_all_rows_filtered_out_is_an_error(tmp_path, tok):
    _write_json(tmp_path / "empty.json", [{"instruction": "", "output": ""}] * 5)
    with pytest.raises(DataError, match="No usable training examples"):
        prepare_data(_cfg(tmp_path, SourceConfig(path="empty.json")), tok, 256, 4)


def test_hub_id_offline_without_a_copy(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="Cannot load hub dataset 'someone/nothing-here'.*no offline copy"):
        load_source(SourceConfig(path="someone/nothing-here"), _cfg(tmp_path))


def _offline_copy_dir(tmp_path):
    """A data directory laid out like the shared one, holding the tests' own records as the copy."""
    folder = tmp_path / "data"
    (folder / "alpaca").mkdir(parents=True)
    shutil.copy(ASSETS / "instructions.json", folder / "alpaca" / "alpaca_5000.json")
    return folder


def test_hub_id_offline_uses_the_known_copy(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data_cfg = DataConfig(data_dir=str(_offline_copy_dir(tmp_path)))
    rows, origin, sample = load_source(SourceConfig(path="tatsu-lab/alpaca"), data_cfg)
    assert len(rows) == 96 and origin.endswith("alpaca/alpaca_5000.json") and sample is None
    assert "using the offline copy" in capsys.readouterr().out


def test_hub_unreachable_and_no_copy_names_both_ways(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("QLORA_DATA_DIR", raising=False)
    with pytest.raises(DataUnavailable, match=r"(?s)'tatsu-lab/alpaca'.*HF_HUB_OFFLINE is set.*connect to the "
                                              r"network.*QLORA_DATA_DIR to a folder holding alpaca/alpaca_5000.json"):
        load_source(SourceConfig(path="tatsu-lab/alpaca"), DataConfig())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataUnavailable, match=f"{empty} has no alpaca/alpaca_5000.json"):
        load_source(SourceConfig(path="tatsu-lab/alpaca"), DataConfig(data_dir=str(empty)))


@pytest.fixture
def reachable_hub(monkeypatch):
    """HF_ENDPOINT at a real listening socket on 127.0.0.1, so the reachability probe passes; the
    hub's datasets themselves cannot run here, so `datasets.load_dataset` serves a local file (the
    one stand-in) and records how it was called."""
    import datasets

    server = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    calls = []
    real = datasets.load_dataset

    def from_local_file(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        files = {"tatsu-lab/alpaca": ASSETS / "instructions.json", "openai/gsm8k": ASSETS / "gsm8k" / f"{split}.jsonl"}
        return real("json", data_files=str(files[path]), split="train")

    monkeypatch.setattr(datasets, "load_dataset", from_local_file)
    yield calls
    server.close()


def test_hub_dataset_is_loaded_from_the_hub_and_sampled_by_seed(reachable_hub, tmp_path):
    cfg = DataConfig(sources=[SourceConfig(path="tatsu-lab/alpaca", sample=50)], seed=3)
    rows, origin, sample = load_source(cfg.sources[0], cfg)
    assert reachable_hub == [("tatsu-lab/alpaca", None, "train")] and origin == "hub:tatsu-lab/alpaca[train]"
    assert len(rows) == 50 and sample["rows"] == 50 and sample["of"] == 96 and sample["seed"] == 3
    assert sample["indices"] == sorted(sample["indices"]) and len(set(sample["indices"])) == 50
    records = json.loads((ASSETS / "instructions.json").read_text())
    assert rows == [records[i] for i in sample["indices"]]
    again = load_source(cfg.sources[0], cfg)[2]["indices"]
    other = load_source(cfg.sources[0], DataConfig(sources=cfg.sources, seed=4))[2]["indices"]
    assert again == sample["indices"] and other != sample["indices"]
    rows, _, _ = load_source(SourceConfig(path="openai/gsm8k", split="test"), cfg)
    assert reachable_hub[-1] == ("openai/gsm8k", "main", "test") and len(rows) == 6


def test_the_sample_is_recorded_in_the_data_report(reachable_hub, tok):
    cfg = DataConfig(sources=[SourceConfig(path="tatsu-lab/alpaca", sample=40)], eval_size=8)
    report = prepare_data(cfg, tok, 256, 4).report
    source = report["sources"]["tatsu-lab/alpaca"]
    assert source["origin"] == "hub:tatsu-lab/alpaca[train]" and source["rows"] == 40
    assert source["sample"]["of"] == 96 and len(source["sample"]["indices"]) == 40
    (row,) = dropped_table(report)  # what notebook 03 shows
    assert row["from"] == "hub:tatsu-lab/alpaca[train]" and row["sampled"] == "40 of 96 (seed 42)"


def test_jsonl_with_byte_order_mark_and_crlf_loads(tmp_path):
    rows = [{"instruction": "Say hi.", "output": "Hi."}, {"instruction": "Say bye.", "output": "Bye."}]
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps(r).encode() + b"\r\n" for r in rows))
    assert read_records(path) == rows
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    assert read_records(array) == rows


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_deeply_nested_json_is_a_data_error_naming_the_file(tmp_path, suffix):
    path = tmp_path / f"deep{suffix}"
    path.write_text("[" * 300_000 + "]" * 300_000 + "\n")
    with pytest.raises(DataError, match=f"{path.name}.*nested too deeply"):
        read_records(path)


def test_missing_file_is_named(tmp_path, tok):
    with pytest.raises(DataError, match="nope.jsonl does not exist"):
        prepare_data(_cfg(tmp_path, SourceConfig(path="nope.jsonl")), tok, 256, 4)


# --- formats ---------------------------------------------------------------------------------------


def test_every_format_and_file_type(tmp_path, tok):
    chat = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"yo {i}"}]}
            for i in range(6)]
    share = [{"conversations": [{"from": "human", "value": f"q {i}"}, {"from": "gpt", "value": f"a {i}"}]}
             for i in range(6)]
    pc = [{"prompt": f"2+{i}=", "completion": f"{2 + i}"} for i in range(6)]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in chat))
    _write_json(tmp_path / "share.json", share)
    with open(tmp_path / "pc.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(pc)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS[:6]), tmp_path / "al.parquet")
    sources = [SourceConfig(path=p) for p in ("chat.jsonl", "share.json", "pc.csv", "al.parquet")]
    for template in ("alpaca", "chat"):
        prepared = prepare_data(_cfg(tmp_path, *sources, eval_size=4, template=template), tok, 256, 4)
        fmts = {n: s["format"] for n, s in prepared.report["sources"].items()}
        assert fmts == {"chat": "messages", "share": "sharegpt", "pc": "prompt_completion", "al": "alpaca"}
        assert prepared.report["kept"] == 24
        by_prompt = {e["prompt"]: e for e in prepared.train + prepared.eval}
        assert "2+3=" in by_prompt and by_prompt["2+3="]["response"] == "5"  # prompt/completion: verbatim
        if template == "chat":
            assert any("<|im_start|>user\nq 1<|im_end|>" in p for p in by_prompt)


def test_multi_turn_renders_with_both_templates(tmp_path, tok):
    conv = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
                          {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                          {"role": "assistant", "content": f"d{i}"}]}
            for i in range(5)]
    (tmp_path / "mt.jsonl").write_text("\n".join(json.dumps(r) for r in conv))
    # alpaca: the system message and the earlier turns are the Input, the last user turn the Instruction
    prepared = prepare_data(_cfg(tmp_path, SourceConfig(path="mt.jsonl"), eval_size=1), tok, 256, 4)
    e = prepared.train[0]
    assert "### Instruction:\nc\n\n### Input:\nBe brief.\n\nConversation so far:\nUser: a\nAssistant: b" \
        in e["prompt"] and e["response"].startswith("d")
    prepared = prepare_data(_cfg(tmp_path, SourceConfig(path="mt.jsonl"), eval_size=1, template="chat"), tok, 256, 4)
    e = prepared.train[0]
    assert "<|im_start|>assistant\nb" in e["prompt"] and e["response"].startswith("d")


def tokenize_pair(tok, prompt: str, response: str, train_on_prompt: bool = False) -> dict:
    return encode_pairs("alpaca", tok, [(prompt, response)], train_on_prompt)[0]


def test_render_conversation_rule():
    one = render_conversation([{"role": "user", "content": "Add 2 and 3."}], "alpaca", None)
    assert one == format_alpaca({"instruction": "Add 2 and 3.", "output": ""})[0]
    for bad in ([{"role": "system", "content": "s"}],
                [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]):
        with pytest.raises(BadConversation, match="no user message|assistant turn follows"):
            render_conversation(bad, "alpaca", None)


def test_alpaca_template_with_and_without_input():
    prompt, response = format_alpaca({"instruction": "Add.", "input": "2 and 3", "output": "5"})
    assert "### Input:\n2 and 3" in prompt and prompt.endswith("### Response:\n") and response == "5"
    prompt, _ = format_alpaca({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert "### Input" not in prompt


def test_labels_mask_the_prompt_and_padding(tok):
    a = tokenize_pair(tok, "Question: 2+2?\nAnswer:", " 4")
    b = tokenize_pair(tok, "Q?", " a longer answer here")
    n_prompt = len(tok("Question: 2+2?\nAnswer:")["input_ids"])
    assert a["labels"][:n_prompt] == [-100] * n_prompt
    assert a["labels"][n_prompt:] == a["input_ids"][n_prompt:] and a["input_ids"][-1] == tok.eos_token_id
    batch = collate([a, b], tok.pad_token_id)
    short = 1 if len(b["input_ids"]) < len(a["input_ids"]) else 0
    pads = batch["attention_mask"][short] == 0
    assert pads.any() and (batch["labels"][short][pads] == -100).all()
    everything = tokenize_pair(tok, "Question: 2+2?\nAnswer:", " 4", train_on_prompt=True)
    assert everything["labels"] == everything["input_ids"]


# --- mixtures, split, cache ---------------------------------------------------------------------------


def test_mixture_weights_caps_and_tags(tmp_path, tok):
    _write_json(tmp_path / "a.json", ROWS)
    _write_json(tmp_path / "b.json", [{"instruction": f"Repeat {i}.", "output": f"{i} {i}"} for i in range(40)])
    cfg = _cfg(tmp_path, SourceConfig(path="a.json", max_rows=10),
               SourceConfig(path="b.json", weight=0.5), eval_size=6)
    prepared = prepare_data(cfg, tok, 256, 4)
    split = prepared.report["split_by_source"]
    assert sum(split["eval"].values()) == 6
    assert split["train"].get("a", 0) + split["eval"].get("a", 0) == 10
    assert split["train"].get("b", 0) + split["eval"].get("b", 0) == 20
    assert {e["source"] for e in prepared.train} == {"a", "b"}
    boosted = prepare_data(_cfg(tmp_path, SourceConfig(path="a.json", weight=2.0), eval_size=4), tok, 256, 4)
    assert boosted.report["train"] == 72  # 36 training rows, each twice; eval never repeats


def test_split_is_deterministic_and_cache_is_reused(tmp_path, tok):
    _write_json(tmp_path / "a.json", ROWS)
    cfg = _cfg(tmp_path, SourceConfig(path="a.json"), eval_size=5)
    folder = RunFolder(tmp_path / "run")
    first = prepare_data(cfg, tok, 256, 4, folder=folder)
    again = prepare_data(cfg, tok, 256, 4, folder=folder)
    assert again.reused and not first.reused
    assert [e["input_ids"] for e in again.train] == [e["input_ids"] for e in first.train]
    assert load_split(folder, "eval", limit=2) == first.eval[:2]
    other = prepare_data(DataConfig(**{**cfg.__dict__, "seed": 7}), tok, 256, 4, folder=folder)
    assert not other.reused and {e["row"] for e in other.eval} != {e["row"] for e in first.eval}
    assert not list(folder.data_dir.glob(".*"))  # no temporary leftovers


def test_heldout_pairs_reads_the_split_03_saves(tmp_path, tok):
    """Stage 02's pairs are 03's eval split: read from the run folder when 03 saved it, else
    prepared once by 03's own function (which 03 then reuses)."""
    run = setup_run("smoke", "pairs", ["train.wandb=disabled"], str(tmp_path))
    assert not run.data_report.exists()
    pairs = heldout_pairs(run, 3, tok)
    prepared = prepare_data(run.cfg.data, tok, run.cfg.model.max_seq_length, run.cfg.train.micro_batch_size,
                            folder=run)
    assert prepared.reused and pairs == prepared.eval_pairs()[:3] and len(pairs) == 3
    assert heldout_pairs(run, 3, tok) == pairs  # the second time: read back, nothing rebuilt


@pytest.mark.realdata
def test_real_alpaca_sample_statistics_and_speed(data_dir, tok):
    cfg = load_config("default").data
    prepared = prepare_data(cfg, tok, 512, 4)
    report = prepared.report
    assert report["sources"]["tatsu-lab/alpaca"]["rows"] == 5000
    assert report["kept"] + sum(report["dropped"].values()) == 5000
    assert report["eval"] == 200 and report["train"] == report["kept"] - 200
    assert 100 < report["lengths"]["total"]["mean"] < 125  # DESIGN: mean ~113 tokens
    efficiency = report["padding_efficiency"]
    assert efficiency["packed"]["efficiency"] > efficiency["batch_4"]["efficiency"] + 0.2


def test_padding_efficiency_by_hand():
    assert padding_efficiency([4, 4, 4, 4], 2) == 1.0
    assert padding_efficiency([2, 4], 2) == pytest.approx(6 / 8)


# --- packing ----------------------------------------------------------------------------------------


def test_packing_keeps_examples_whole_and_within_budget(tok):
    exs = [tokenize_pair(tok, f"Prompt number {i} " * (i % 5 + 1), f" answer {i}") for i in range(30)]
    rows = pack_examples(exs, 64)
    assert sorted(n for r in rows for n in r["seq_lens"]) == sorted(len(e["input_ids"]) for e in exs)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    for r in rows:
        starts = [sum(r["seq_lens"][:k]) for k in range(len(r["seq_lens"]))]
        assert all(r["position_ids"][s] == 0 for s in starts) and all(r["labels"][s] == -100 for s in starts)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_examples_run_one_by_one(tiny_dir, tok, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation=attn, dtype=torch.float32)
    pairs = [("Hello there", " general kenobi"), ("What is 2+2?", " four"),
             ("A much longer prompt with many words in it", " and a response of several words"),
             ("Short", " x")]
    exs = [tokenize_pair(tok, p, r, train_on_prompt=True) for p, r in pairs]
    rows = pack_examples(exs, 48)
    assert len(rows) < len(exs)  # something was actually packed together
    batch = collate_packed(rows, tok.pad_token_id, bool_mask=attn == "sdpa")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        packed = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   batch["labels"][:, 1:].reshape(-1), reduction="sum")
        n_packed = int((batch["labels"][:, 1:] != -100).sum())
        total, n = 0.0, 0
        for e in exs:
            out = model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]]))
            k = sum(1 for x in e["labels"][1:] if x != -100)
            total += out.loss.item() * k
            n += k
    assert n_packed == n
    assert packed.item() / n_packed == pytest.approx(total / n, rel=1e-5, abs=1e-6)


def test_user_errors_are_qlora_errors_that_name_the_setting(tok):
    import copy

    from qlora_helpers.errors import ConfigError, QLoraError
    from qlora_helpers.prompts import NoChatTemplate, render_instruction
    from qlora_helpers.scoring import heldout_loss

    with pytest.raises(DataError, match=r"packed row of 8 tokens.*train.packed_tokens"):
        pack_examples([{"input_ids": list(range(12)), "labels": list(range(12))}], budget=8)
    with pytest.raises(DataError, match=r"No held-out examples.*data.eval_size"):
        heldout_loss(None, tok, [], batch_size=2, max_length=64, template="alpaca")
    with pytest.raises(DataError, match=r"longer than model.max_seq_length=4"):
        heldout_loss(None, tok, [("A long prompt here", "and a long answer")], batch_size=2, max_length=4,
                     template="alpaca")
    plain = copy.copy(tok)
    plain.chat_template = None
    for render_chat in (lambda: render_instruction("chat", plain, "Hi"),
                        lambda: render_conversation([{"role": "user", "content": "Hi"}], "chat", plain)):
        with pytest.raises(NoChatTemplate, match="data.template=alpaca"):  # one type, one message, every path
            render_chat()
    assert issubclass(NoChatTemplate, ConfigError)
    assert issubclass(DataError, QLoraError) and issubclass(ConfigError, QLoraError)


def test_padding_efficiency_grouped_by_length_uses_the_trainers_order():
    # transformers' group_by_length sampler sorts inside mega-batches: mixed lengths waste less padding
    lengths = [8, 200] * 100
    shuffled = padding_efficiency(lengths, 4)
    grouped = padding_efficiency(lengths, 4, by_length=True)
    assert grouped > 0.9 > 0.7 > shuffled
