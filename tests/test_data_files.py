"""Stage 03's reading of data files and its errors: what a file holds reaches training unchanged, and a
file or setting that cannot work says what is wrong and what to do (tests/test_data.py has the rest)."""

import csv
import json
import random

import pytest

from qlora_helpers.config import SourceConfig
from qlora_helpers.errors import DataError
from qlora_helpers.prepared import prepare_data
from qlora_helpers.sources import load_table, read_records
from tests.data_fixtures import ROWS, _cfg, _write_json, tok  # noqa: F401 - tok: a fixture

# --- CSV -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("line_end", ["\n", "\r\n"])
def test_csv_quoted_fields_keep_their_line_breaks_and_line_numbers_stay_right(tmp_path, line_end):
    path = tmp_path / "multi.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator=line_end)
        writer.writerow(["instruction", "output"])
        writer.writerow(["first line\nsecond line", "one\n\nthree"])
        writer.writerow(["plain", "row"])
        writer.writerow(["a", "b", "extra"])
    rows = read_records(path)
    assert rows[0] == {"instruction": "first line\nsecond line", "output": "one\n\nthree"}
    assert rows[1] == {"instruction": "plain", "output": "row"}
    # the header is line 1, the first row lines 2-5, the second line 6: the bad row is row 3 on line 7
    assert str(rows[2]) == "row 3 (line 7) has 3 field(s), the header has 2"


def test_csv_unreadable_row_names_the_line_it_starts_on(tmp_path):
    path = tmp_path / "unclosed.csv"
    path.write_text('instruction,output\n"two\nlines",ok\nfine,row\n"never closed,' + "x" * 200_000 + "\n")
    with pytest.raises(DataError, match=r"unclosed.csv, the row starting at line 5: not readable as CSV.*"
                                        r"unclosed quote"):
        read_records(path)


def test_csv_rows_with_more_or_fewer_fields_than_the_header_are_dropped_and_counted(tmp_path, tok):
    lines = ["instruction,output"] + [f"Say {i}.,{i}" for i in range(10)] + ["Say 10.,10,lost", "Say 11."]
    (tmp_path / "ragged.csv").write_text("\n".join(lines) + "\n")
    prepared = prepare_data(_cfg(tmp_path, SourceConfig(path="ragged.csv"), eval_size=2), tok, 256, 4)
    report = prepared.report
    assert report["dropped"] == {"wrong_field_count": 2} and report["kept"] == 10
    details = [e["detail"] for e in report["dropped_examples"]["wrong_field_count"]]
    assert details == ["row 11 (line 12) has 3 field(s), the header has 2",
                       "row 12 (line 13) has 1 field(s), the header has 2"]
    assert not any("lost" in e["response"] or e["response"] is None for e in prepared.train + prepared.eval)
    # a reader that cannot drop rows (stage 05's tasks) is told which row instead of getting it cut
    with pytest.raises(DataError, match=r"ragged.csv: row 11 \(line 12\) has 3 field\(s\), the header has 2"):
        load_table("ragged.csv", _cfg(tmp_path))


def test_csv_header_naming_a_column_twice_is_an_error(tmp_path):
    path = tmp_path / "twice.csv"
    path.write_text("instruction,output,output\nq,a,b\n")
    with pytest.raises(DataError, match=r"twice.csv, line 1: the header names the column\(s\) \['output'\] more"):
        read_records(path)


# --- JSONL -----------------------------------------------------------------------------------------


def test_jsonl_records_holding_line_separator_characters_load(tmp_path):
    rows = [{"instruction": "para\u2028graph\u2029end", "output": "next\x85line"},
            {"instruction": "plain", "output": "row"}]
    path = tmp_path / "seps.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert read_records(path) == rows
    path.write_text(path.read_text(encoding="utf-8") + '{"bad": \n', encoding="utf-8")
    with pytest.raises(DataError, match="seps.jsonl, line 3: not valid JSON"):
        read_records(path)


def test_a_non_utf8_byte_after_a_byte_order_mark_names_its_line(tmp_path):
    path = tmp_path / "marked.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"a": "b"}\n\xe9"}\n')  # the bad byte opens line 2, at byte 14
    with pytest.raises(DataError, match=r"marked.jsonl is not UTF-8 text \(line 2, byte 14:"):
        read_records(path)


# --- empty sources, folders, mappings --------------------------------------------------------------


@pytest.mark.parametrize(("name", "text", "fmt"), [
    ("empty.jsonl", "", "auto"), ("blank.jsonl", "\n\n", "auto"), ("empty.csv", "", "auto"),
    ("header.csv", "instruction,output\n", "auto"), ("array.json", "[]", "auto"), ("zero.json", "", "auto"),
    ("forced.jsonl", "", "alpaca")])
def test_a_file_without_rows_says_so(tmp_path, tok, name, text, fmt):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=rf"{name} has no rows: the file is empty.*remove it from data.sources"):
        prepare_data(_cfg(tmp_path, SourceConfig(path=name, format=fmt)), tok, 256, 4)


def test_a_folder_as_data_path_says_it_is_a_folder_and_lists_its_files(tmp_path, tok):
    (tmp_path / "mine" / "sub").mkdir(parents=True)
    _write_json(tmp_path / "mine" / "sub" / "rows.json", ROWS)
    (tmp_path / "mine" / "notes.txt").write_text("not data")
    with pytest.raises(DataError, match=r"mine is a folder .*name the file itself. It holds 1 data file\(s\) "
                                        r"within two levels, e.g. sub/rows.json"):
        prepare_data(_cfg(tmp_path, SourceConfig(path=str(tmp_path / "mine"))), tok, 256, 4)
    (tmp_path / "bare").mkdir()
    with pytest.raises(DataError, match="bare is a folder .*It holds no .json, .jsonl, .csv or .parquet file"):
        prepare_data(_cfg(tmp_path, SourceConfig(path="./bare")), tok, 256, 4)


def test_a_column_mapping_naming_a_column_the_file_lacks_is_an_error(tmp_path, tok):
    _write_json(tmp_path / "plain.json", ROWS)
    src = SourceConfig(path="plain.json", columns={"instruction": "question", "output": "answer"})
    with pytest.raises(DataError, match=r"plain.json: data.sources\[\].columns maps 'instruction' to the column "
                                        r"'question', which no row has; its columns are \['input', 'instruction', "
                                        r"'output'\]"):
        prepare_data(_cfg(tmp_path, src, eval_size=2), tok, 256, 4)


# --- nothing left to train on ----------------------------------------------------------------------


def test_no_usable_examples_names_each_files_reasons_with_a_row(tmp_path, tok):
    _write_json(tmp_path / "blank.json", [{"instruction": f"q{i}", "output": ""} for i in range(40)])
    _write_json(tmp_path / "odd.json", [{"instruction": "q", "output": 5}] * 3 + [{"output": "x"}])
    sources = [SourceConfig(path="blank.json"), SourceConfig(path="odd.json")]
    with pytest.raises(DataError) as err:
        prepare_data(_cfg(tmp_path, *sources), tok, 256, 4)
    msg = str(err.value)
    assert "every row was dropped" in msg
    assert "blank.json: 40 rows read, 0 kept; dropped: 40 empty_field (row 1: 'output' is empty)" in msg
    assert ("odd.json: 4 rows read, 0 kept; dropped: 3 not_a_string (row 1: 'output' is int, not text), "
            "1 missing_field (row 4: no 'instruction')") in msg


def test_a_weight_that_rounds_a_source_to_no_rows_says_so(tmp_path, tok):
    _write_json(tmp_path / "few.json", ROWS)
    with pytest.raises(DataError, match=r"few.json: weight 0.01 of its 40 usable rows rounds to 0 rows.*weight "
                                        r"to at least 0.025"):
        prepare_data(_cfg(tmp_path, SourceConfig(path="few.json", weight=0.01), eval_size=2), tok, 256, 4)


def test_eval_size_errors_say_how_many_examples_are_usable_and_what_to_set(tmp_path, tok):
    _write_json(tmp_path / "same.json", [ROWS[0]] * 40)
    with pytest.raises(DataError) as err:
        prepare_data(_cfg(tmp_path, SourceConfig(path="same.json")), tok, 256, 4)
    msg = str(err.value)
    assert "Only 1 usable example(s) (40 rows read, 39 dropped: 39 duplicate)" in msg
    assert "at least 2, one to train on and one to evaluate" in msg and "data.dedupe=false" in msg
    _write_json(tmp_path / "ten.json", ROWS[:10])
    with pytest.raises(DataError, match=r"data.eval_size=200 leaves nothing to train on: there are 10 usable "
                                        r"example\(s\) \(10 rows read, 0 dropped\).*--set data.eval_size=K with K "
                                        r"from 1 to 9"):
        prepare_data(_cfg(tmp_path, SourceConfig(path="ten.json")), tok, 256, 4)


# --- the same rules for 04b's preference pairs -----------------------------------------------------


def test_preference_files_follow_the_same_rules(tmp_path, tok):
    from qlora_helpers.config import PreferenceConfig, PreferenceSourceConfig
    from qlora_helpers.preference_data import load_preference_sources

    def load(**src):
        return load_preference_sources(PreferenceConfig(sources=[PreferenceSourceConfig(**src)]), _cfg(tmp_path), tok)

    lines = ["prompt,chosen,rejected", "Say hi.,Hi.,Go away.", 'Say bye.,"Bye,\nfriend.",No.', "Say no.,No.,Yes.,lost"]
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    pairs, report = load(path="pairs.csv")
    assert [p["chosen"] for p in pairs] == ["Hi.", "Bye,\nfriend."]
    assert report["dropped"] == {"wrong_field_count": 1}
    with pytest.raises(DataError, match=r"pairs.csv: preference.sources\[\].columns maps 'chosen' to the column "
                                        r"'preferred', which no row has"):
        load(path="pairs.csv", columns={"chosen": "preferred"})
    (tmp_path / "none.jsonl").write_text("")
    with pytest.raises(DataError, match="none.jsonl has no rows.*remove it from preference.sources"):
        load(path="none.jsonl")


# --- row numbers -----------------------------------------------------------------------------------


def test_row_numbers_are_the_files_also_when_sample_draws_the_rows(tmp_path, tok):
    # with `sample: N` a dropped row was numbered by its place in the draw (row 3 of 20), not in the file
    rows = [dict(r, output="" if i >= 30 else r["output"]) for i, r in enumerate(ROWS)]  # file rows 31-40: empty
    _write_json(tmp_path / "some.json", rows)
    report = prepare_data(_cfg(tmp_path, SourceConfig(path="some.json", sample=20), eval_size=2), tok, 256, 4).report
    drawn = [i + 1 for i in report["sources"]["some"]["sample"]["indices"]]
    dropped = [e["row"] for e in report["dropped_examples"]["empty_field"]]
    assert dropped and all(r in drawn and r > 30 for r in dropped)
    _write_json(tmp_path / "blank.json", [dict(r, output="") for r in ROWS])
    first = min(random.Random(42).sample(range(40), 5)) + 1  # the draw of data.seed 42
    with pytest.raises(DataError, match=rf"5 rows read, 0 kept; dropped: 5 empty_field \(row {first}: "):
        prepare_data(_cfg(tmp_path, SourceConfig(path="blank.json", sample=5)), tok, 256, 4)

    from qlora_helpers.config import PreferenceConfig, PreferenceSourceConfig
    from qlora_helpers.preference_data import load_preference_sources

    pairs = [{"prompt": f"Say {i}.", "chosen": f"{i}", "rejected": "" if i >= 30 else "no"} for i in range(40)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    pref = PreferenceConfig(sources=[PreferenceSourceConfig(path="pairs.jsonl", sample=20)])
    kept, pair_report = load_preference_sources(pref, _cfg(tmp_path), tok)
    assert all(p["prompt"].endswith(f"Say {p['row'] - 1}.\n\n### Response:\n") for p in kept)
    drawn = [i + 1 for i in pair_report["sources"]["pairs"]["sample"]["indices"]]
    assert all(e["row"] in drawn and e["row"] > 30 for e in pair_report["dropped_examples"]["empty_rejected"])


def test_no_usable_preference_pairs_names_each_files_reasons_with_a_row(tmp_path, tok):
    # it printed only a dict of reason counts, with no file and no row to look at
    from qlora_helpers.config import PreferenceConfig, PreferenceSourceConfig
    from qlora_helpers.preference_data import load_preference_sources

    empty_chosen = [json.dumps({"prompt": f"q{i}", "chosen": "", "rejected": "r"}) for i in range(3)]
    (tmp_path / "a.jsonl").write_text("\n".join(empty_chosen) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "x", "rejected": "x"}) + "\n")
    pref = PreferenceConfig(sources=[PreferenceSourceConfig(path="a.jsonl"), PreferenceSourceConfig(path="b.jsonl")])
    with pytest.raises(DataError) as err:
        load_preference_sources(pref, _cfg(tmp_path), tok)
    msg = str(err.value)
    assert msg.startswith("No usable preference pairs: every row was dropped.")
    assert f"{tmp_path / 'a.jsonl'}: 3 rows read, 0 kept; dropped: 3 empty_chosen (row 1: 'chosen' is empty)" in msg
    assert (f"{tmp_path / 'b.jsonl'}: 1 rows read, 0 kept; dropped: 1 identical (row 1: chosen and rejected are "
            f"the same text)") in msg
    assert "preference.sources[].columns" in msg
