import datetime
import json
import re

import pytest

from qlora_helpers import builtin_data
from qlora_helpers.builtin_data import exact_match, final_answer, generate_records, split_records
from qlora_helpers.config import DataConfig, SourceConfig, load_config
from qlora_helpers.paths import PROJECT_ROOT
from qlora_helpers.prepared import prepare_data
from qlora_helpers.sources import DataUnavailable, builtin_notice, check_sources, load_source, training_sources

ASSETS = PROJECT_ROOT / "tests" / "assets" / "data"


@pytest.fixture
def offline(monkeypatch):
    """No hub, no data directory: a fresh clone on a machine without network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("QLORA_DATA_DIR", raising=False)


# --- the records ----------------------------------------------------------------------------------


def test_records_are_deterministic_distinct_and_cover_every_family():
    first, again, other = generate_records(42, 500), generate_records(42, 500), generate_records(7, 500)
    assert first == again and first != other
    assert len({(r["instruction"], r["input"]) for r in first}) == 500
    assert {r["family"] for r in first} == set(builtin_data.FAMILIES)
    assert all(set(r) == {"instruction", "input", "output", "family"} and r["output"] for r in first)
    # the recorded first record pins the generator: changing it changes every built-in run's data
    assert first[0]["output"] == "58 + 20 = 78. 78 - 71 = 7.\nAnswer: 7"


def _numbers(text):
    return [int(x) for x in re.findall(r"\d+", text)]


def _check(record):
    """Recompute the answer of a record from its instruction and input, family by family."""
    family, text, given, out = record["family"], record["instruction"], record["input"], record["output"]
    answer = final_answer(out)
    if family == "add_then_give":
        a, b, c = _numbers(text)
        return answer == str(a + b - c)
    if family == "groups":
        boxes, each, extra = _numbers(text)
        return answer == str(boxes * each + extra)
    if family == "unit_conversion":
        value = _numbers(text)[0]
        factor = _numbers(out.split("so")[0])[1]
        return answer.split()[0] == str(value * factor)
    if family == "date_to_words":
        return datetime.datetime.strptime(answer, "%B %d, %Y").date().isoformat() == given
    if family == "date_to_iso":
        return datetime.datetime.strptime(given, "%d %B %Y").date().isoformat() == answer
    if family == "sort_numbers":
        return _numbers(answer) == sorted(_numbers(given), reverse="largest to" in text)
    if family == "sort_words":
        return answer.split(", ") == sorted(given.split(", "))
    if family == "filter_numbers":
        want = [n for n in _numbers(given) if (n % 2 == 0) == ("even" in text)]
        return _numbers(answer) == want
    if family == "filter_words":
        return answer.split(", ") == ([w for w in given.split(", ") if len(w) > 4] or ["none"])
    if family == "csv_to_json":
        header, *rows = given.split("\n")
        want = [{k: int(v) if v.isdigit() else v for k, v in zip(header.split(","), row.split(","))} for row in rows]
        return json.loads(answer) == want
    if family == "reformat_words":
        words = given.split()
        return answer in (given.upper(), given.title(), " ".join(reversed(words)), "-".join(words))
    if family == "count_items":
        items = given.split(", ")
        quoted = re.search(r"'(\w+)'", text)
        return answer == str(items.count(quoted.group(1)) if quoted else len(items))
    if family == "largest":
        return answer == str(min(_numbers(given)) if "smallest" in text else max(_numbers(given)))
    raise AssertionError(f"no check for family {family}")


def test_every_answer_is_right():
    records = generate_records(3, 650)
    wrong = [r for r in records if not _check(r)]
    assert not wrong, wrong[:3]


def test_split_is_disjoint_and_sized():
    train, held = split_records(42, 200)
    assert len(train) == builtin_data.RECORDS - 200 and len(held) == 200
    keys = lambda rows: {(r["instruction"], r["input"]) for r in rows}  # noqa: E731
    assert not keys(train) & keys(held)
    assert split_records(42, 200) == (train, held)
    with pytest.raises(ValueError, match="eval_size=0"):
        split_records(42, 0)


# --- checking answers -----------------------------------------------------------------------------


def test_final_answer_and_exact_match():
    assert final_answer("3 + 4 = 7.\nAnswer: 7") == "7"
    assert final_answer("Answer: 3500 cm.\n\n### Instruction:\nmore") == "3500 cm"
    assert final_answer("2, 5, 9\n\n### Instruction: Sort these") == "2, 5, 9"
    refs = ["3 + 4 = 7.\nAnswer: 7", "2, 5, 9", '[{"name": "Ana", "age": 31}]', "RIVER SUN", "May 20, 2022"]
    preds = ["3 plus 4 is 7\nAnswer: 7\nAnswer: 7",   # the first answer line counts, runoff after it does not
             "2, 5, 9 and then more text",            # no stop at the blank line: the answer is wrong
             '[{"name":"Ana","age":31}]',             # the same JSON value, other spacing
             "river sun",                             # case counts
             "May 20, 2022."]                         # a trailing full stop does not
    result = exact_match(preds, refs)
    assert result["per_example"] == [True, False, True, False, True]
    assert result["exact_match"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_match(["a", "b"], ["a"])


# --- the fallback: a run works anywhere -----------------------------------------------------------


def test_offline_without_a_copy_trains_on_the_builtin_data(offline):
    cfg = load_config("default").data
    used, why = training_sources(cfg)
    assert why == ("hub dataset 'tatsu-lab/alpaca' is unreachable (HF_HUB_OFFLINE is set) and has no offline "
                   "copy (no data directory is set: QLORA_DATA_DIR or data.data_dir)")
    assert [s.path for s in used.sources] == ["builtin"] and used.eval_size == 200 and used.seed == cfg.seed
    assert check_sources(cfg) == why
    line = builtin_notice(why)
    assert "\n" not in line and line.startswith("Training on the project's built-in data instead")
    assert "shared" not in line  # no folder a user cannot have
    rows, origin, sample = load_source(used.sources[0], used)
    assert rows == generate_records(cfg.seed) and origin.startswith("built-in") and sample is None


def test_sources_that_can_be_read_are_kept(offline, tmp_path):
    (tmp_path / "alpaca").mkdir()
    (tmp_path / "alpaca" / "alpaca_5000.json").write_text((ASSETS / "instructions.json").read_text())
    cfg = DataConfig(data_dir=str(tmp_path), sources=[SourceConfig(path="tatsu-lab/alpaca")])
    assert training_sources(cfg) == (cfg, None) and check_sources(cfg) is None
    files = DataConfig(data_dir=str(ASSETS), sources=[SourceConfig(path="instructions.json")])
    assert training_sources(files) == (files, None)


def test_a_missing_file_or_a_refused_fallback_is_still_an_error(offline, tmp_path):
    missing = DataConfig(data_dir=str(tmp_path), sources=[SourceConfig(path="nope.json")])
    with pytest.raises(DataUnavailable, match=r"nope\.json does not exist"):
        check_sources(missing)
    strict = DataConfig(builtin_fallback=False)
    with pytest.raises(DataUnavailable, match=r"(?s)'tatsu-lab/alpaca' \(HF_HUB_OFFLINE is set\).*QLORA_DATA_DIR "
                                              r"to a folder holding alpaca/alpaca_5000.json"):
        check_sources(strict)


def test_prepare_data_records_the_fallback(offline, tmp_path, embedded_dir, capsys):
    from qlora_helpers.models import load_tokenizer

    tok = load_tokenizer(load_config("default").model)
    cfg = load_config("default", ["data.eval_size=40"]).data
    prepared = prepare_data(cfg, tok, 512, 4)
    report = prepared.report
    assert report["builtin_fallback"].startswith("hub dataset 'tatsu-lab/alpaca' is unreachable")
    assert list(report["sources"]) == ["built-in"] and report["sources"]["built-in"]["format"] == "alpaca"
    assert report["dropped"] == {} and report["kept"] == builtin_data.RECORDS
    assert report["eval"] == 40 and report["train"] == builtin_data.RECORDS - 40
    assert capsys.readouterr().out.count("Training on the project's built-in data instead") == 1
    assert all(e["response"] for e in prepared.eval)


def test_the_sets_an_adapter_was_trained_on_are_never_replaced_by_other_data(offline, tmp_path, embedded_dir):
    # rerunning 02 or 03 in a shell without QLORA_DATA_DIR once resolved the hub source to the built-in data
    # and replaced the run's saved sets, so 05 then scored an Alpaca-trained adapter on other examples
    from qlora_helpers.errors import DataError
    from qlora_helpers.models import load_tokenizer
    from qlora_helpers.runs import RunFolder

    tok = load_tokenizer(load_config("default").model)
    rows = json.loads((ASSETS / "instructions.json").read_text())
    data = tmp_path / "data"
    (data / "alpaca").mkdir(parents=True)
    (data / "alpaca" / "alpaca_5000.json").write_text(json.dumps(rows))
    (data / "mine.json").write_text(json.dumps(rows))
    hub = load_config("default", [f"data.data_dir={data}", "data.eval_size=8"]).data
    folder = RunFolder(tmp_path / "run")
    assert prepare_data(hub, tok, 256, 4, folder=folder).report["builtin_fallback"] is None
    folder.checkpoints_dir.mkdir(parents=True)  # 04 has started on these sets
    assert prepare_data(hub, tok, 256, 4, folder=folder).reused  # the same data: reused, as always
    unset = load_config("default", ["data.eval_size=8"]).data  # a shell without QLORA_DATA_DIR
    with pytest.raises(DataError, match=rf"(?s){folder.data_dir} holds the sets this run's adapter was trained on "
                                        rf"\(tatsu-lab/alpaca from {data}/alpaca/alpaca_5000.json\).*the built-in "
                                        r"data, because hub dataset 'tatsu-lab/alpaca' is unreachable.*QLORA_DATA_DIR"
                                        r".*start a new run"):
        prepare_data(unset, tok, 256, 4, folder=folder)
    assert json.loads(folder.data_report.read_text())["builtin_fallback"] is None  # still the trained-on sets
    # a data file edited: before training the sets follow it; after, the same refusal
    mine = load_config("default", [f"data.data_dir={data}", "data.eval_size=8",
                                   "data.sources=[{path: mine.json}]"]).data
    other = RunFolder(tmp_path / "other")
    prepare_data(mine, tok, 256, 4, folder=other)
    (data / "mine.json").write_text(json.dumps(rows[:60]))
    assert prepare_data(mine, tok, 256, 4, folder=other).report["kept"] == 60
    (other.adapter_dir / "adapter_config.json").parent.mkdir()
    (other.adapter_dir / "adapter_config.json").write_text("{}")  # 04 has finished
    (data / "mine.json").write_text(json.dumps(rows[:50]))
    with pytest.raises(DataError, match=r"mine.json changed since \(size or modification time\)"):
        prepare_data(mine, tok, 256, 4, folder=other)
    assert json.loads(other.data_report.read_text())["kept"] == 60


def test_a_hub_like_path_naming_a_local_file_or_folder_is_ambiguous(offline, tmp_path, monkeypatch):
    # `path: mine` for a folder or file in the data directory was taken for a hub id; offline the run then
    # trained on the built-in data, saying nothing of the file
    from qlora_helpers.errors import DataError

    data = tmp_path / "data"
    (data / "mine").mkdir(parents=True)
    (data / "mine" / "rows.json").write_text((ASSETS / "instructions.json").read_text())
    (data / "notes").write_text("a file without a suffix")
    for ref, kind in (("mine", "folder"), ("notes", "file")):
        cfg = DataConfig(data_dir=str(data), sources=[SourceConfig(path=ref)])
        with pytest.raises(DataError, match=rf"'{ref}' reads as a hub dataset id .*a {kind} {data / ref} exists in "
                                            rf"the data directory.*write './{ref}'.*full id, org/name"):
            check_sources(cfg)
        with pytest.raises(DataError, match="reads as a hub dataset id"):
            load_source(cfg.sources[0], cfg)
    here = tmp_path / "here"
    (here / "org" / "set").mkdir(parents=True)
    monkeypatch.chdir(here)
    with pytest.raises(DataError, match=rf"a folder {here / 'org' / 'set'} exists in the current directory.*full "
                                        rf"path, '{here / 'org' / 'set'}'.*move or rename the local folder"):
        check_sources(DataConfig(data_dir=str(data), sources=[SourceConfig(path="org/set")]))
    # not ambiguous: a known id's own offline-copy folder, and an id nothing local is called
    (data / "gsm8k").mkdir()
    (data / "gsm8k" / "train.jsonl").write_text((ASSETS / "gsm8k" / "train.jsonl").read_text())
    assert check_sources(DataConfig(data_dir=str(data), sources=[SourceConfig(path="gsm8k")])) is None
    why = check_sources(DataConfig(data_dir=str(data), sources=[SourceConfig(path="other")]))
    assert "'other' is unreachable" in why and "it has no '/', and hub dataset ids are org/name" in why
    assert "no '/'" not in check_sources(DataConfig(sources=[SourceConfig(path="org/other")]))
