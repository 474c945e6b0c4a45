"""Where things live: the project root, run folders, caches; and atomic file writes."""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import QLoraError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
OUTPUTS_DIR = PROJECT_ROOT / "outputs"

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp / mkdtemp make owner-only files (0600) and folders (0700); what we write is an ordinary
# output (a server in another account, a colleague, a container reads it), so it gets the modes an
# ordinary open() or mkdir() would give under the process's umask.
_UMASK = _umask()


def cache_dir(configured: str | None = None) -> Path:
    """Cache for converted and built models: config value, $QLORA_CACHE_DIR, or ~/.cache/qlora-notebooks."""
    root = configured or os.environ.get("QLORA_CACHE_DIR") or "~/.cache/qlora-notebooks"
    return Path(root).expanduser()


def run_dir(run_name: str, outputs_dir: str | Path | None = None, create: bool = True) -> Path:
    """The folder of one run, `outputs/<run_name>/`."""
    if not _RUN_NAME.match(run_name or ""):
        raise QLoraError(f"Run name {run_name!r} is not usable as a folder name: use letters, "
                         f"digits, '.', '_' and '-', starting with a letter or digit.")
    base = Path(outputs_dir) if outputs_dir else OUTPUTS_DIR
    if not base.is_absolute():
        base = PROJECT_ROOT / base
    path = base / run_name
    blocked = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:  # mkdir would fail with NotADirectoryError (or FileExistsError)
        raise QLoraError(f"{blocked} is a file, not a folder: run folders go inside a folder. Give "
                         f"--outputs-dir (a notebook's outputs_dir) a folder, or move the file away.")
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write JSON to a temporary file beside `path`, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write text beside `path`, then rename (no half-written file on a crash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def atomic_dir(final_dir: str | Path):
    """Yield a temporary folder beside `final_dir`; when the block succeeds, move it into place
    (an older copy is removed only after the move); when it fails, nothing at `final_dir` changes."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", dir=final_dir.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        _replace_dir(tmp, final_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_utf8(path: Path, error: type[QLoraError] = QLoraError) -> str:
    """A text file a user wrote (a config, a data file); one that is not UTF-8 raises `error` naming
    the line and byte. A leading byte-order mark (some Windows editors write one) is not content."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        at = exc.start + (3 if raw.startswith(codecs.BOM_UTF8) else 0)  # utf-8-sig counts after the mark
        line = raw[:at].count(b"\n") + 1
        raise error(f"{path} is not UTF-8 text (line {line}, byte {at}: {exc.reason}). "
                    f"Re-save it as UTF-8.") from None


def sha256_file(path: str | Path) -> str:
    """A file's sha256, hex (what a copied run keeps, where it may not keep modification times)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise QLoraError(f"{path} does not exist. Run the stage that writes it first "
                         f"(python -m qlora_helpers run --stages ...).")
    return json.loads(path.read_text(encoding="utf-8"))
