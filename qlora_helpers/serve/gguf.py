"""GGUF export through llama.cpp's own converter, and the Ollama Modelfile beside it.

The `[gguf]` extra installs llama-cpp-python (pinned) and sentencepiece. Its wheel holds the compiled
llama.cpp library (loading, quantizing, running GGUF files) but not llama.cpp's converter
(`convert_hf_to_gguf.py` with its `conversion/` package and its own `gguf-py/`), which only the
source distribution vendors. We run that converter, from the very sdist the installed library
was built from, never one of our own: `fetch_converter` asks pip for
`llama-cpp-python==<installed version>` as an sdist (`pip download --no-binary`, served from pip's
cache after the install that built the wheel) and unpacks just those parts into the environment
(`<sys.prefix>/share/qlora-notebooks/llama.cpp-<version>/`), so converter, `gguf-py` and the
library that loads and quantizes the file all come from one llama.cpp commit. (The `gguf` package
on PyPI plus a script fetched from GitHub would mix two commits, and GitHub is out of reach on
some machines.) `QLORA_LLAMA_CPP_DIR` may point at a llama.cpp checkout instead.

The converter writes f16 (one run of it costs ~15-80 s on 2 cores, mostly importing torch and
transformers); q8_0 and q4_k_m are quantized from that f16 file by llama.cpp's quantizer
(`llama_model_quantize`, what `llama-quantize` runs, through llama-cpp-python's binding), in a
second or two for a 135M model.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from ..config import GGUF_TYPES
from ..errors import QLoraError
from ..models import load_tokenizer
from ..paths import read_json, sha256_file, write_text_atomic
from ..prompts import render_conversation, template_stops
from ..runs import Run
from .run import context_length, model_name, say

CONVERTER_TYPES = ("f16",)  # written by convert_hf_to_gguf.py itself; the others (GGUF_TYPES) are quantized from f16
DISTRIBUTION = "llama-cpp-python"
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
INSTALL_HINT = ("install the [gguf] extra: `make gguf`, or `pip install -e '.[gguf]'` "
                "(builds llama-cpp-python from source: CMake and a C++ compiler, ~10 min on 2 cores)")


class GgufUnavailable(QLoraError):
    """llama-cpp-python (the [gguf] extra) is not installed, or its converter cannot be found."""


def llama_cpp_version() -> str | None:
    """The installed llama-cpp-python's version, or None without the [gguf] extra."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def gguf_available() -> bool:
    return llama_cpp_version() is not None


def require_llama_cpp():
    """The `llama_cpp` module, or GgufUnavailable saying how to install it."""
    if not gguf_available():
        raise GgufUnavailable(f"GGUF export and serving need llama-cpp-python: {INSTALL_HINT}.")
    # llama.cpp's CPU threads are OpenMP threads that meet at every op; spinning at those barriers on a
    # busy machine made it as slow as torch (0.5 tokens/s), sleeping 13-37 (BENCHMARKS.md). Read once,
    # when its OpenMP runtime starts; the serve command sets the same for torch's.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import llama_cpp

    return llama_cpp


_LOG_CALLBACK = None
_LOG_STATE = {"level": 0, "line": ""}
# Warnings that llama.cpp also sums up in one line of its own: the quantizer warns once per tensor whose
# rows do not split into k-quant blocks (180 lines for SmolLM2's 576-wide rows at q4_k_m), then says
# "WARNING: 180 of 272 tensor(s) required fallback quantization"; that line is kept.
SUMMED_UP = (re.compile(r"not divisible by \d+ \(required for type .*\) -> falling back to"),)


def log_line_shown(level: int, line: str) -> bool:
    """Whether quiet_logs writes one complete llama.cpp log line: warnings and errors, less SUMMED_UP."""
    return level >= 3 and not any(p.search(line) for p in SUMMED_UP)


def quiet_logs(lib) -> None:
    """llama.cpp's warnings and errors to stderr, not its loading chatter (hundreds of lines that
    would bury the server's request log or fill 06's export cell). ggml's levels: 3 warn, 4 error,
    5 continues the last line; pieces are joined into lines before they are judged."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None:
        return

    @lib.llama_log_callback
    def log(level, text, user_data):
        if level != 5:
            _LOG_STATE["level"] = level
        _LOG_STATE["line"] += text.decode("utf-8", "replace")
        if _LOG_STATE["line"].endswith("\n"):
            line, _LOG_STATE["line"] = _LOG_STATE["line"], ""
            if log_line_shown(_LOG_STATE["level"], line):
                sys.stderr.write(line)

    _LOG_CALLBACK = log  # kept alive: llama.cpp holds the pointer
    lib.llama_log_set(log, ctypes.c_void_p(0))


AMX_NOTE = ("llama.cpp was built with Intel AMX kernels for this CPU, which crash the process on the first "
            "forward pass of quantized weights on some Xeons, virtual machines included (llama.cpp#20824; here "
            "the q8_0 and the embedded Q4_1 GGUF did, f16 did not): loading without llama.cpp's extra buffer "
            "types (AMX and weight repacking), which is slower but sound")
_AMX_SAID = False


def model_params(lib):
    """llama.cpp's load parameters for this machine. On one where llama.cpp would use AMX (its system info
    says `AMX_INT8 = 1`), extra buffer types are off, and the reason is printed once per process."""
    global _AMX_SAID
    params = lib.llama_model_default_params()
    if "AMX_INT8 = 1" in lib.llama_print_system_info().decode("utf-8", "replace"):
        params.use_extra_bufts = False
        if not _AMX_SAID:
            print(f"note: {AMX_NOTE}.", file=sys.stderr, flush=True)
            _AMX_SAID = True
    return params


def cpu_threads() -> int:
    """The cores this process may use (llama-cpp-python's default is half of them; torch uses all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def gguf_path(run: Run, gguf_type: str) -> Path:
    check_type(gguf_type)
    return run.gguf_file(gguf_type)


def check_type(gguf_type: str) -> str:
    if gguf_type not in GGUF_TYPES:
        raise QLoraError(f"Unknown GGUF type {gguf_type!r}; valid: {', '.join(GGUF_TYPES)}.")
    return gguf_type


# --- llama.cpp's converter, from the sdist the library was built from ------------------------------


def converter_dir(fetch: bool = True) -> Path:
    """The folder holding llama.cpp's `convert_hf_to_gguf.py` (fetched once when `fetch`)."""
    configured = os.environ.get("QLORA_LLAMA_CPP_DIR")
    if configured:
        folder = Path(configured).expanduser()
        if not (folder / "convert_hf_to_gguf.py").is_file():
            raise GgufUnavailable(f"$QLORA_LLAMA_CPP_DIR={folder} holds no convert_hf_to_gguf.py; point it at "
                                  f"a llama.cpp checkout, or unset it to use the one matching llama-cpp-python.")
        return folder
    version = llama_cpp_version()
    if version is None:
        raise GgufUnavailable(f"GGUF export needs llama-cpp-python: {INSTALL_HINT}.")
    folder = Path(sys.prefix) / "share" / "qlora-notebooks" / f"llama.cpp-{version}"
    if not (folder / "convert_hf_to_gguf.py").is_file():
        if not fetch:
            raise GgufUnavailable(f"llama.cpp's converter is not in {folder}; run "
                                  f"`make gguf` (or call converter_dir()) to fetch it.")
        fetch_converter(version, folder)
    return folder


def fetch_converter(version: str, folder: Path) -> Path:
    """Unpack the converter parts of the llama-cpp-python `version` sdist into `folder` (atomically)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", DISTRIBUTION,
               f"{DISTRIBUTION}=={version}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise GgufUnavailable(f"Could not get the {DISTRIBUTION}=={version} source distribution, which holds "
                                  f"llama.cpp's converter ({' '.join(cmd[2:])} said: {done.stderr.strip()[-400:]}). "
                                  f"Run it where PyPI (or pip's cache) is reachable, or set "
                                  f"QLORA_LLAMA_CPP_DIR to a llama.cpp checkout.")
        staged = Path(tmp) / "llama.cpp"
        with tarfile.open(archives[0]) as tar:
            prefix = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
            members = []
            for m in tar.getmembers():
                rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
                if rel and any(rel == p or rel.startswith(p) for p in CONVERTER_PARTS) and (m.isfile() or m.isdir()) \
                        and ".." not in Path(rel).parts:
                    m.name = rel
                    members.append(m)
            kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(staged, members=members, **kw)
        if not (staged / "convert_hf_to_gguf.py").is_file():
            raise GgufUnavailable(f"The {DISTRIBUTION}=={version} sdist has no vendor/llama.cpp/convert_hf_to_gguf.py.")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staged, folder)
    return folder


def run_converter(merged: Path, out: Path, outtype: str) -> str:
    """llama.cpp's convert_hf_to_gguf.py on a transformers folder; its output, or a QLoraError with it."""
    script = converter_dir() / "convert_hf_to_gguf.py"
    cmd = [sys.executable, str(script), str(merged), "--outtype", outtype, "--outfile", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise QLoraError(f"llama.cpp's converter failed on {merged} (--outtype {outtype}, exit {done.returncode}):\n"
                         f"{tail}\nThe model's architecture or tokenizer may be one this llama.cpp "
                         f"({DISTRIBUTION} {llama_cpp_version()}) does not convert.")
    return done.stdout + done.stderr


def quantize(source: Path, out: Path, gguf_type: str) -> None:
    """llama.cpp's quantizer (`llama_model_quantize`) from a 16-bit GGUF to `gguf_type`."""
    llama_cpp = require_llama_cpp()
    quiet_logs(llama_cpp)  # its loader and per-tensor lines (~600) to nowhere; warnings still show
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{check_type(gguf_type).upper()}")  # llama.cpp's name for it
    params.nthread = cpu_threads()
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if code != 0 or not out.is_file():
        raise QLoraError(f"llama.cpp could not quantize {source} to {gguf_type} "
                         f"(llama_model_quantize returned {code}).")


def merged_parameters(run: Run) -> int:
    """How many weights merged/ holds (from the safetensors headers; tied embeddings counted once,
    as the GGUF stores them)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(run.merged_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is no dict: it cannot be iterated
                total += math.prod(f.get_slice(key).get_shape())
    return total


def bits_per_weight(path: Path, parameters: int) -> float:
    """A GGUF file's size in bits per weight (`parameters`: merged_parameters): 16 for f16 (plus
    metadata), 8.5 for q8_0; q4_k_m is ~4.9 where every row length is a multiple of 256, and more
    where llama.cpp has to fall back to q5_0/q8_0 for tensors whose rows are not (SmolLM2's 576)."""
    return round(path.stat().st_size * 8 / parameters, 2)


# --- export ------------------------------------------------------------------------------------------------


def gguf_staleness(run: Run, gguf_type: str) -> str | None:
    """Why the GGUF file of `gguf_type` cannot be used as it is (missing, or older than merged/, which a
    re-merge rewrote), or None. A file older than merged/ that export.json's gate checked, byte for byte,
    from the merge merged/ holds is current: a run copied without its file times (`cp -r`) may order
    them either way."""
    path = gguf_path(run, gguf_type)
    if not path.is_file():
        return f"{path.name} is missing"
    merged = run.merged_dir / "config.json"
    older = merged.is_file() and path.stat().st_mtime < merged.stat().st_mtime
    if older and not checked_from_this_merge(run, gguf_type):
        return f"{path.name} is older than merged/ (made from an earlier merge)"
    return None


def gguf_form_name(gguf_type: str) -> str:
    """The export gate's name for the GGUF form of `gguf_type` (its results in export.json)."""
    return f"gguf-{gguf_type}"


def merge_id(run: Run) -> str | None:
    """Which merge merged/ holds: a hash of its merge.json (written once per merge; a copy keeps it)."""
    if not run.merge_report.is_file():
        return None
    return hashlib.sha256(run.merge_report.read_bytes()).hexdigest()[:16]


def file_digest(path: Path) -> dict[str, Any]:
    """A file's size and sha256: what the gate records of each GGUF file it checked."""
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def is_checked_file(run: Run, gguf_type: str, checked: dict[str, Any]) -> bool:
    """Whether the GGUF file of `gguf_type` (there) is the one export.json's gate recorded as `checked`
    (its file_digest): another size is another file; one no newer than export.json is the one checked;
    a newer one is hashed (a copy that did not keep times), so the common case reads no GGUF bytes."""
    path = gguf_path(run, gguf_type)
    now = path.stat()
    if now.st_size != checked["size"]:
        return False
    return now.st_mtime <= run.export_report.stat().st_mtime or sha256_file(path) == checked["sha256"]


def checked_from_this_merge(run: Run, gguf_type: str) -> bool:
    """Whether export.json's gate checked the GGUF file of `gguf_type` as it is now (is_checked_file)
    and against the merge merged/ holds, so the file was made from that merge."""
    if not run.export_report.is_file():
        return False
    report = read_json(run.export_report)
    if report.get("merge_id") is None or report["merge_id"] != merge_id(run):
        return False
    result = next((f for f in report.get("forms", []) if f.get("form") == gguf_form_name(gguf_type)), {})
    checked = result.get("file") or {}
    return "sha256" in checked and is_checked_file(run, gguf_type, checked)


def export_gguf(run: Run, types: list[str] | tuple[str, ...], served: str | None = None,
                modelfile_too: bool = True) -> dict[str, Any]:
    """Convert `merged/` to each GGUF type in `gguf/` (each file written beside, then renamed) and,
    with `modelfile_too`, write the Ollama Modelfile FROM `served` (default: the first type). The
    merged model must be exported first (`export.ensure_merged`)."""
    types = [check_type(t) for t in types]
    if not types:
        raise QLoraError("No GGUF type asked; pick from " + ", ".join(GGUF_TYPES) + ".")
    require_llama_cpp()
    merged = run.merged_dir
    if not run.has_merged:
        raise QLoraError(f"No merged model in {merged} to convert to GGUF: run ensure_merged (06_serve) "
                         f"or `python -m qlora_helpers export --run {run.path}` first.")
    folder = run.gguf_dir
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}
    parameters = merged_parameters(run)
    f16 = gguf_path(run, "f16")
    fresh = gguf_staleness(run, "f16") is None
    quantized = [t for t in types if t not in CONVERTER_TYPES]
    work = [t for t in types if t in CONVERTER_TYPES]
    if quantized and "f16" not in work and not fresh:
        work.insert(0, "f16")  # the quantizer's input, kept as a form of its own
    for gguf_type in work + quantized:
        start = time.perf_counter()
        final = gguf_path(run, gguf_type)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        say(f"writing {final.name}: " + (f"llama.cpp's converter on {merged} (a minute or two)"
                                          if gguf_type in CONVERTER_TYPES else f"quantizing {f16.name}"))
        try:
            if gguf_type in CONVERTER_TYPES:
                run_converter(merged, tmp, gguf_type)
                how = f"convert_hf_to_gguf.py --outtype {gguf_type}"
            else:
                quantize(f16, tmp, gguf_type)
                how = f"llama_model_quantize from {f16.name}"
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        files[gguf_type] = {"path": str(final), "mib": round(final.stat().st_size / 2**20, 1),
                            "bits_per_weight": bits_per_weight(final, parameters), "how": how,
                            "seconds": round(time.perf_counter() - start, 1)}
    served = served or types[0]
    if modelfile_too:
        write_text_atomic(run.modelfile, modelfile(run, served))
    return {"gguf": files, "modelfile": str(run.modelfile) if modelfile_too else None,
            "served": served if modelfile_too else None, "llama_cpp_python": llama_cpp_version()}


def _go_literal(text: str) -> str:
    """Text placed verbatim in a Go template (Ollama's TEMPLATE): `{{` would open an action."""
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(run: Run, tokenizer) -> str:
    """The run's prompt template as an Ollama Go template: the server's own rule
    (`prompts.render_conversation`) rendered around markers that become {{ .System }} and {{ .Prompt }}."""

    system, prompt = "\x00SYSTEM\x00", "\x00PROMPT\x00"
    template = run.cfg.data.template

    def go(messages):
        text = _go_literal(render_conversation(messages, template, tokenizer))
        return text.replace(system, "{{ .System }}").replace(prompt, "{{ .Prompt }}")

    alone = go([{"role": "user", "content": prompt}])
    with_system = go([{"role": "system", "content": system}, {"role": "user", "content": prompt}])
    return f"{{{{ if .System }}}}{with_system}{{{{ else }}}}{alone}{{{{ end }}}}{{{{ .Response }}}}"


def stop_tokens(tokenizer) -> list[str]:
    """The strings that end an answer: the tokenizer's EOS (what training appended), and any other
    end token the model's generation config names."""
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    return list(dict.fromkeys(stops))


def modelfile(run: Run, served: str) -> str:
    tokenizer = load_tokenizer(run.cfg.model)
    template = ollama_template(run, tokenizer)
    if '"""' in template:
        raise QLoraError('The prompt template contains """, which an Ollama Modelfile cannot quote.')
    lines = [f"# Ollama: `ollama create {model_name(run)} -f Modelfile` in this folder, then "
             f"`ollama run {model_name(run)}`.",
             f"# Run {run.name}: the merged adapter as GGUF ({served}), prompt template "
             f"'{run.cfg.data.template}' as in training.",
             f"FROM ./{run.gguf_file(served).name}",
             f'TEMPLATE """{template}"""']
    stops = [*stop_tokens(tokenizer), *template_stops(run.cfg.data.template, tokenizer)]  # as the server stops
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append(f"PARAMETER num_ctx {context_length(run)}")
    return "\n".join(lines) + "\n"

