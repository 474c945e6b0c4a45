"""What the data tests share (tests/test_data.py, tests/test_data_files.py): the embedded model's
tokenizer, a data config over a folder, a JSON file writer and 40 simple Alpaca rows."""

import json

import pytest

from qlora_helpers.config import DataConfig, load_config


@pytest.fixture(scope="module")
def tok(embedded_dir):
    from qlora_helpers.models import load_tokenizer

    return load_tokenizer(load_config("default").model)


def _cfg(tmp_path, *sources, **kw):
    return DataConfig(data_dir=str(tmp_path), sources=list(sources), **kw)


def _write_json(path, rows):
    path.write_text(json.dumps(rows))
    return path


ROWS = [{"instruction": f"Say the number {i}.", "input": "", "output": f"{i}"} for i in range(40)]
