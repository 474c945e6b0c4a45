"""Atomic writes: whole files or nothing, with the modes an ordinary write would give."""

import stat

import pytest

from qlora_helpers.paths import atomic_dir, write_json_atomic, write_text_atomic


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_files_and_folders_get_ordinary_modes(tmp_path):
    import qlora_helpers.paths as paths

    mask = paths._UMASK  # read at import: the process's umask
    written = write_text_atomic(tmp_path / "table.md", "| a |\n")
    assert written.read_text() == "| a |\n" and _mode(written) == 0o666 & ~mask
    assert _mode(write_json_atomic(tmp_path / "sub" / "x.json", {"a": 1})) == 0o666 & ~mask
    with atomic_dir(tmp_path / "adapter") as tmp:
        (tmp / "weights").write_text("w")
    assert _mode(tmp_path / "adapter") == 0o777 & ~mask and (tmp_path / "adapter" / "weights").read_text() == "w"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "sub", "table.md"]  # no temporary left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = write_text_atomic(tmp_path / "report.json", "old")
    with pytest.raises(TypeError):
        write_text_atomic(target, 123)  # not text: fails inside the write
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "merged") as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("stopped half-way")
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
