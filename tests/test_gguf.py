"""GGUF export for real: llama.cpp's own converter on a smoke run's merged model, the file loaded by
llama.cpp (llama-cpp-python), its tokens and greedy answers against transformers', the Ollama
Modelfile, and the export gate (`python -m qlora_helpers export`, export.json).

Needs the [gguf] extra (`make gguf`; `make test` installs it). Without it these tests are skipped
and say so; `.ci/run` sets QLORA_REQUIRE_GGUF=1, which makes that a failure instead.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.serve_fixtures import API_KEY, copy_run, export, run, write_adapter  # noqa: F401 - fixtures

pytestmark = [pytest.mark.gguf, pytest.mark.integration]  # never in the unit tier


@pytest.fixture(scope="module", autouse=True)
def gguf_extra():
    from tests.serve_fixtures import require_gguf

    require_gguf()


@pytest.fixture(scope="module")
def exported(run, export):
    """`python -m qlora_helpers export --run <run> --gguf q8_0 --gguf f16 --gguf q4_k_m --gguf q5_k_m`: its
    exit code and output (the export gate runs on every form)."""
    cmd = [sys.executable, "-m", "qlora_helpers", "export", "--run", str(run.path),
           "--gguf", "q8_0", "--gguf", "f16", "--gguf", "q4_k_m", "--gguf", "q5_k_m"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def test_export_writes_the_gguf_files_and_an_ollama_modelfile(run, exported):
    from qlora_helpers.models import load_tokenizer
    from qlora_helpers.prompts import render_conversation

    assert exported.returncode == 0, exported.stdout + exported.stderr
    folder = run.gguf_dir
    for t in ("f16", "q8_0", "q4_k_m", "q5_k_m"):
        assert (folder / f"model-{t}.gguf").read_bytes()[:4] == b"GGUF"
    sizes = {t: (folder / f"model-{t}.gguf").stat().st_size for t in ("f16", "q8_0", "q4_k_m", "q5_k_m")}
    assert sizes["f16"] > sizes["q8_0"] > sizes["q4_k_m"] and sizes["f16"] > sizes["q5_k_m"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left
    text = (folder / "Modelfile").read_text()
    assert "FROM ./model-q8_0.gguf\n" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert "PARAMETER num_ctx 256" in text and 'PARAMETER stop "### Response:"' in text  # the server's stops
    template = text.split('TEMPLATE """')[1].split('"""')[0]
    # the Go template, without a system message, is the server's own rendering of a user turn
    alone = template.split("{{ else }}")[1].split("{{ end }}")[0]
    tokenizer = load_tokenizer(run.cfg.model)
    expected = render_conversation([{"role": "user", "content": "Name a colour."}], run.cfg.data.template, tokenizer)
    assert alone.replace("{{ .Prompt }}", "Name a colour.") == expected
    assert template.endswith("{{ .Response }}")


def test_llama_cpp_tokenizes_and_generates_like_transformers(run, export, exported, tmp_path):
    """An f32 GGUF (the converter's exact copy of the merged weights) in llama.cpp: the same prompt
    token ids as the run's tokenizer and the same greedy tokens as the merged model in transformers."""
    import torch

    from qlora_helpers.models import load_tokenizer
    from qlora_helpers.serve import Job, generate_jobs, load_merged
    from qlora_helpers.serve.gguf import run_converter
    from qlora_helpers.serve.llamacpp import LlamaCppModel

    f32 = tmp_path / "model-f32.gguf"
    run_converter(run.merged_dir, f32, "f32")
    tokenizer = load_tokenizer(run.cfg.model)
    prompts = ["The capital of France is", "Write a long story about a dragon who",
               "### Instruction:\nName a colour.\n\n### Response:\n", "<|im_start|>user\nHi<|im_end|>\n"]
    gguf = LlamaCppModel(f32, context=64, rows=len(prompts))
    merged = load_merged(run)
    try:
        for p in prompts:
            assert gguf.tokenize(p) == tokenizer(p)["input_ids"], p
        ids = tokenizer(prompts[0])["input_ids"]
        with torch.no_grad():
            want = torch.log_softmax(merged(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        got = torch.log_softmax(gguf.logits(ids, 0), -1)
        assert (got - want).abs().max() < 1e-3  # the same function, to float rounding

        def greedy(model):
            jobs = [Job(tokenizer(p)["input_ids"], 12, lambda *a: None, ignore_eos=True) for p in prompts]
            generate_jobs(model, tokenizer, jobs)  # all rows in one batch: rows share llama_decode calls
            return [j.tokens for j in jobs]

        assert greedy(gguf) == greedy(merged)
    finally:
        gguf.close()


def test_the_export_gate_passes_every_form_and_records_why(run, exported):
    report = json.loads(run.export_report.read_text())
    forms = {f["form"]: f for f in report["forms"]}
    assert list(forms) == ["adapter", "merged", "gguf-q8_0", "gguf-f16", "gguf-q4_k_m", "gguf-q5_k_m"]
    assert report["passed"] and report["failed"] == []
    assert "export gate: every form agrees with the adapter model" in exported.stdout
    assert all(t["equal"] for t in report["tokenization"].values())
    assert len(report["probes"]) == 4 and all(len(p["reference_tokens"]) > 0 for p in report["probes"])
    assert forms["adapter"]["mean_kl"] < 1e-9  # the reference model itself, through the serving engine
    assert forms["adapter"]["greedy_equal"] == 4
    for f in forms.values():
        assert 0 <= f["mean_kl"] <= f["kl_bound"]
        for g in f["greedy"]:
            assert g["equal"] or g["near_tie"], (f["form"], g)
    # coarser weights move the distributions more
    assert forms["gguf-q4_k_m"]["mean_kl"] > forms["gguf-q8_0"]["mean_kl"]
    # what was written, as stage 06 records it
    assert report["export"]["served"] == "q8_0" and report["note"] is None
    assert list(report["export"]["gguf"]) == ["f16", "q8_0", "q4_k_m", "q5_k_m"]
    assert report["export"]["gguf"]["q8_0"]["bits_per_weight"] > 8


def test_export_without_gguf_writes_serve_gguf_and_the_report_stage_06_writes(run, exported, tmp_path):
    """`export --run R` without --gguf used to check no GGUF and drop the GGUF results (and the
    `export` and `note` keys) from export.json while the files stayed, and still pass."""
    from qlora_helpers.paths import read_json
    from qlora_helpers.serve.forms import gguf_form
    from qlora_helpers.serve.gate import gate_warning

    copy = copy_run(run, tmp_path)
    modelfile = copy.modelfile.read_bytes()
    cmd = [sys.executable, "-m", "qlora_helpers", "export", "--run", str(copy.path), "--set", "serve.gguf=[q8_0]"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"reusing {copy.merged_dir} (merged from adapter/" in done.stdout
    assert "writing model-q8_0.gguf: quantizing model-f16.gguf" in done.stdout  # f16 is current: not converted
    assert "export gate: checking gguf-q8_0" in done.stdout
    report = read_json(copy.export_report)
    # the other types' results stay: their files are the same merge's, unchanged since the gate checked them
    assert [f["form"] for f in report["forms"]] == ["adapter", "merged", "gguf-q8_0", "gguf-f16", "gguf-q4_k_m",
                                                    "gguf-q5_k_m"] and report["note"] is None
    assert report["export"]["served"] == "q8_0" and list(report["export"]["gguf"]) == ["q8_0", "f16", "q4_k_m",
                                                                                       "q5_k_m"]
    assert set(report["export"]["gguf"]["q8_0"]) == {"path", "mib", "bits_per_weight", "how", "seconds"}
    assert copy.modelfile.read_bytes() == modelfile  # FROM the same first type
    # serving a form this export.json has no result for, or one it flagged, warns at startup
    assert gate_warning(copy, gguf_form("q8_0")) is None and gate_warning(copy, gguf_form("q5_k_m")) is None
    report["forms"] = [f for f in report["forms"] if f["form"] != "gguf-q5_k_m"]
    flagged = next(f for f in report["forms"] if f["form"] == "gguf-q8_0")
    flagged.update(passed=False, problems=["probe 2: greedy differs at token 4 (margin 0.7 nats > 0.5)"])
    copy.export_report.write_text(json.dumps(report))  # as the gate writes a flagged form (q4_k_m on SmolLM2)
    assert gate_warning(copy, gguf_form("q5_k_m")) == (
        f"the export gate has not checked gguf-q5_k_m (export.json has no result for it): "
        f"`python -m qlora_helpers export --run {copy.path} --gguf q5_k_m` checks it")
    assert gate_warning(copy, gguf_form("q8_0")) == ("the export gate flagged gguf-q8_0: probe 2: greedy "
                                                     "differs at token 4 (margin 0.7 nats > 0.5)")


def test_an_export_of_one_type_keeps_the_earlier_results_that_hold_and_says_why_it_drops_the_others(
        run, exported, tmp_path):
    """`export --gguf q8_0` after an export of four types used to rewrite export.json with q8_0's result
    alone, although the other files were still there and still the merge's. f16's result stays, its
    file unchanged since and from the same merge; q5_k_m's file is gone and q4_k_m's is older than
    merged/ (an earlier merge's, by the times an export.json without recorded digests goes by): those
    two are dropped, each with a line saying why."""
    from qlora_helpers.paths import read_json
    from qlora_helpers.serve.forms import gguf_form
    from qlora_helpers.serve.gate import gate_warning

    copy = copy_run(run, tmp_path)
    before = read_json(copy.export_report)
    # q4_k_m's result as an export.json from before the recorded digests has it: judged by file times
    older = [{k: v for k, v in f.items() if k != "file" or f["form"] != "gguf-q4_k_m"} for f in before["forms"]]
    stamp = copy.export_report.stat().st_mtime
    copy.export_report.write_text(json.dumps({**before, "forms": older}))
    os.utime(copy.export_report, (stamp, stamp))
    copy.gguf_file("q5_k_m").unlink()
    merged_at = (copy.merged_dir / "config.json").stat().st_mtime
    os.utime(copy.gguf_file("q4_k_m"), (merged_at - 60, merged_at - 60))
    cmd = [sys.executable, "-m", "qlora_helpers", "export", "--run", str(copy.path), "--gguf", "q8_0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ("export gate: keeping gguf-f16's earlier result (model-f16.gguf is unchanged since export.json "
            "checked it, from the merge merged/ holds)") in done.stdout
    assert ("export gate: dropping gguf-q4_k_m's earlier result: model-q4_k_m.gguf is older than merged/ (made "
            "from an earlier merge)") in done.stdout
    assert "export gate: dropping gguf-q5_k_m's earlier result: model-q5_k_m.gguf is missing" in done.stdout
    assert f"wrote {copy.gguf_file('q8_0')}" in done.stdout and f"wrote {copy.gguf_file('f16')}" not in done.stdout
    report = read_json(copy.export_report)
    forms = {f["form"]: f for f in report["forms"]}
    assert list(forms) == ["adapter", "merged", "gguf-q8_0", "gguf-f16"] and report["passed"]
    assert forms["gguf-f16"] == next(f for f in before["forms"] if f["form"] == "gguf-f16")
    assert list(report["tokenization"]) == ["q8_0", "f16"]
    assert report["tokenization"]["f16"] == before["tokenization"]["f16"]
    assert report["export"]["served"] == "q8_0" and "kept" not in report["export"]["gguf"]["q8_0"]
    assert report["export"]["gguf"]["f16"] == {**before["export"]["gguf"]["f16"], "kept": True}
    assert report["merge_id"] == before["merge_id"]
    assert not [p for p in copy.path.iterdir() if p.name.startswith(".")]  # written beside, then renamed
    assert gate_warning(copy, gguf_form("f16")) is None
    assert "export.json has no result for it" in gate_warning(copy, gguf_form("q4_k_m"))


def test_an_earlier_result_goes_when_its_file_was_rewritten_or_its_merge_or_reference_is_not_this_gates(
        run, exported, tmp_path, capsys):
    """earlier_gguf_results on a copy of the four-type export, as the next gate (`measured`: its merge
    and reference answers) would call it."""
    from qlora_helpers.paths import read_json
    from qlora_helpers.serve.gate import earlier_gguf_results

    copy = copy_run(run, tmp_path)
    measured = read_json(copy.export_report)  # the same merge and reference answers
    assert list(earlier_gguf_results(copy, measured, ["q8_0"])) == ["f16", "q4_k_m", "q5_k_m"]
    capsys.readouterr()
    assert earlier_gguf_results(copy, {**measured, "merge_id": "0" * 16}, []) == {}
    assert ("export gate: dropping gguf-q8_0's earlier result: export.json checked it against an earlier merge "
            "than merged/ holds") in capsys.readouterr().out
    assert earlier_gguf_results(copy, {**measured, "device": "cuda"}, []) == {}
    assert ("dropping gguf-f16's earlier result: export.json checked it against other reference answers "
            "(another device, compute dtype or token budget)") in capsys.readouterr().out
    later = copy.export_report.stat().st_mtime + 5
    os.utime(copy.gguf_file("q5_k_m"), (later, later))  # touched, not changed: still the file checked
    assert list(earlier_gguf_results(copy, measured, [])) == ["q8_0", "f16", "q4_k_m", "q5_k_m"]
    with open(copy.gguf_file("q5_k_m"), "r+b") as f:  # written again, same size, other bytes
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    os.utime(copy.gguf_file("q5_k_m"), (later, later))
    capsys.readouterr()
    assert list(earlier_gguf_results(copy, measured, [])) == ["q8_0", "f16", "q4_k_m"]
    assert ("dropping gguf-q5_k_m's earlier result: model-q5_k_m.gguf was written after export.json checked "
            "it") in capsys.readouterr().out


def test_a_run_copied_without_its_file_times_keeps_its_gate_results(run, exported, tmp_path):
    """A run folder copied as `cp -r` does (times not kept: every file is as new as the copy) used to
    read as GGUFs written after export.json checked them, or older than merged/: serving warned of an
    unchecked file and the next export dropped the kept results. export.json records each checked
    file's size and sha256, so the copy is known to hold the files the gate checked."""
    import shutil

    from qlora_helpers.paths import read_json
    from qlora_helpers.serve import open_run_folder
    from qlora_helpers.serve.forms import gguf_form
    from qlora_helpers.serve.gate import gate_warning
    from qlora_helpers.serve.gguf import gguf_staleness

    report = read_json(run.export_report)
    for t in ("f16", "q8_0", "q4_k_m", "q5_k_m"):
        checked = next(f for f in report["forms"] if f["form"] == f"gguf-{t}")["file"]
        assert checked["size"] == run.gguf_file(t).stat().st_size and len(checked["sha256"]) == 64
    shutil.copytree(run.path, tmp_path / run.path.name, copy_function=shutil.copy)  # `cp -r`: no times kept
    copy = open_run_folder(tmp_path / run.path.name)
    later = copy.export_report.stat().st_mtime + 5  # as the copy may order them: each GGUF newer than both
    for t in ("f16", "q8_0", "q4_k_m", "q5_k_m"):
        os.utime(copy.gguf_file(t), (later, later))
    for t in ("f16", "q8_0", "q4_k_m", "q5_k_m"):
        assert gate_warning(copy, gguf_form(t)) is None, t
    recorded, stamp = copy.export_report.read_bytes(), copy.export_report.stat().st_mtime
    older = {**report, "forms": [{k: v for k, v in f.items() if k != "file"} for f in report["forms"]]}
    copy.export_report.write_text(json.dumps(older))  # an export.json from before the digests: by time
    os.utime(copy.export_report, (stamp, stamp))
    assert "model-f16.gguf was written after export.json checked it" in gate_warning(copy, gguf_form("f16"))
    copy.export_report.write_bytes(recorded)
    os.utime(copy.export_report, (stamp, stamp))
    newest = later + 5
    os.utime(copy.merged_dir / "config.json", (newest, newest))  # or merged/ copied last: every GGUF older
    for t in ("f16", "q8_0", "q4_k_m", "q5_k_m"):
        assert gguf_staleness(copy, t) is None, t  # serving would have converted them all again
    cmd = [sys.executable, "-m", "qlora_helpers", "export", "--run", str(copy.path), "--gguf", "q8_0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dropping" not in done.stdout
    for t in ("f16", "q4_k_m", "q5_k_m"):
        assert f"export gate: keeping gguf-{t}'s earlier result" in done.stdout
    after = read_json(copy.export_report)
    assert [f["form"] for f in after["forms"]] == ["adapter", "merged", "gguf-q8_0", "gguf-f16", "gguf-q4_k_m",
                                                   "gguf-q5_k_m"]
    with open(copy.gguf_file("f16"), "ab") as f:  # another size: another file, whatever its time
        f.write(b"\0")
    os.utime(copy.gguf_file("f16"), (0, 0))
    assert "model-f16.gguf was written after export.json checked it" in gate_warning(copy, gguf_form("f16"))
    with open(copy.merge_report, "a") as f:  # another merge: a GGUF older than merged/ is an earlier one's
        f.write("\n")
    assert gguf_staleness(copy, "q4_k_m") == "model-q4_k_m.gguf is older than merged/ (made from an earlier merge)"


def test_serving_after_a_newer_adapter_merges_and_converts_again_and_warns_of_an_unchecked_gguf(
        run, exported, tmp_path):
    """04b's adapter after the export, served as q5_k_m whose file is gone: merged/ is made again, f16
    converted again and q5_k_m quantized from it, each said; the Modelfile is left alone, and the
    server warns that the gate checked an earlier merge."""
    from qlora_helpers.serve.process import ServerProcess

    copy = copy_run(run, tmp_path)
    modelfile = copy.modelfile.read_bytes()
    copy.gguf_file("q5_k_m").unlink()
    write_adapter(copy, copy.preference_adapter_dir, seed=4)
    srv = ServerProcess(copy, overrides=["serve.form=gguf", "serve.gguf=[q5_k_m]"], api_key=API_KEY).start(600)
    try:
        log = srv.log_path.read_text()
        assert "merged/ is stale: merged/ was made from adapter/, but the run serves adapter_preference/" in log
        assert "exporting model-q5_k_m.gguf for serving (model-q5_k_m.gguf is missing); Modelfile is left" in log
        assert "writing model-f16.gguf: llama.cpp's converter" in log  # the old f16 was the old merge's
        assert (f"WARNING: export.json checked an earlier merge than the one served: `python -m qlora_helpers "
                f"export --run {copy.path} --gguf q5_k_m` checks this one") in log
        assert log.index("WARNING: export.json") < log.index("serving 'serve' on")
        assert srv.health()["status"] == "ok"
    finally:
        srv.stop()
    assert copy.modelfile.read_bytes() == modelfile
    assert copy.gguf_file("q8_0").stat().st_mtime < (copy.merged_dir / "config.json").stat().st_mtime


def test_a_gguf_written_again_from_the_same_merge_is_judged_by_its_bytes_against_what_the_gate_checked(
        run, exported, tmp_path):
    """serve wrote a missing q8_0 file again from the same merge and left export.json as it was; the
    startup warning compared merge ids alone, so it passed a new, never-checked file as checked. The
    gate's recorded sha256 decides: the quantizer wrote the same bytes again (no warning: the gate
    checked them), and a file of other bytes is one the gate has not checked."""
    from qlora_helpers.serve.forms import gguf_form
    from qlora_helpers.serve.gate import gate_warning
    from qlora_helpers.serve.process import ServerProcess

    copy = copy_run(run, tmp_path)
    report = copy.export_report.read_bytes()
    checked = copy.gguf_file("q8_0").read_bytes()
    copy.gguf_file("q8_0").unlink()
    srv = ServerProcess(copy, overrides=["serve.form=gguf", "serve.gguf=[q8_0]"], api_key=API_KEY).start(600)
    try:
        log = srv.log_path.read_text()
        assert f"reusing {copy.merged_dir} (merged from adapter/" in log  # the same merge
        assert "exporting model-q8_0.gguf for serving (model-q8_0.gguf is missing)" in log
        assert "writing model-q8_0.gguf: quantizing model-f16.gguf" in log
        assert "WARNING" not in log  # newer than export.json, but the very bytes the gate checked
        assert srv.health()["status"] == "ok"
    finally:
        srv.stop()
    assert copy.export_report.read_bytes() == report  # the gate's record stays the gate's
    assert copy.gguf_file("q8_0").read_bytes() == checked
    assert copy.gguf_file("q8_0").stat().st_mtime > copy.export_report.stat().st_mtime
    copy.gguf_file("q8_0").write_bytes(checked[:-1] + bytes([checked[-1] ^ 1]))  # same size, other bytes
    assert gate_warning(copy, gguf_form("q8_0")) == (
        f"the export gate has not checked gguf-q8_0 as served: model-q8_0.gguf was written after export.json "
        f"checked it, so export.json's result for it is an earlier file's: `python -m qlora_helpers export "
        f"--run {copy.path} --gguf q8_0` checks this one")
    assert gate_warning(copy, gguf_form("f16")) is None  # a file it did check, unchanged since, still passes


def test_the_gate_flags_a_form_that_answers_differently():
    """check_form on real distributions: a form whose next-token distributions are another model's
    (a broken export) is flagged, with the probe, the token and the margin."""
    import torch

    from qlora_helpers.serve.gate import TIE_MARGIN, check_form

    torch.manual_seed(0)
    ref = torch.log_softmax(torch.randn(6, 50) * 3, -1)
    reference = ref.argmax(-1).tolist()
    probes = [{"reference_tokens": reference, "_ref_logprobs": ref}]
    same = check_form("gguf-q8_0", "itself", [reference], [ref.clone()], probes)
    assert same["passed"] and same["mean_kl"] == pytest.approx(0, abs=1e-7) and same["greedy_equal"] == 1
    other = torch.log_softmax(torch.randn(6, 50) * 3, -1)
    wrong = other.argmax(-1).tolist()
    flagged = check_form("gguf-q8_0", "another model", [wrong], [other], probes)
    first = next(i for i, (a, b) in enumerate(zip(reference, wrong)) if a != b)
    assert not flagged["passed"] and flagged["mean_kl"] > 1
    assert flagged["greedy"][0]["first_difference"] == first
    assert flagged["greedy"][0]["margin"] > TIE_MARGIN
    assert any("mean KL" in p for p in flagged["problems"]) and any("probe 0" in p for p in flagged["problems"])


def test_a_quantized_form_flagged_beside_a_passing_f16_is_explained_and_stays_flagged():
    """q4_k_m on the default profile's SmolLM2: f16 agrees, the probes tokenize alike, q4_k_m's KL is
    within its bound, yet one greedy answer parts where the reference was not near a tie."""
    import torch

    from qlora_helpers.serve.gate import check_form, explain_quantization, gate_summary

    torch.manual_seed(0)
    ref = torch.log_softmax(torch.randn(6, 50) * 3, -1)
    top2 = ref[3].topk(2).indices
    ref[3, top2[1]] = ref[3, top2[0]] - 0.8  # the reference preferred its token by 0.8 nats there
    ref = torch.log_softmax(ref, -1)
    reference = ref.argmax(-1).tolist()
    rounded = ref.clone()
    rounded[3, [top2[0], top2[1]]] = rounded[3, [top2[1], top2[0]]]  # the quantized form swaps the two
    greedy = reference[:3] + [int(top2[1])] + reference[4:]
    probes = [{"reference_tokens": reference, "_ref_logprobs": ref}]
    forms = [check_form("gguf-f16", "f16", [reference], [ref.clone()], probes),
             check_form("gguf-q4_k_m", "q4_k_m", [greedy], [rounded], probes)]
    assert forms[0]["passed"] and not forms[1]["passed"] and forms[1]["mean_kl"] <= forms[1]["kl_bound"]
    report = {"passed": False, "failed": ["gguf-q4_k_m"], "forms": forms}
    explain_quantization(forms, tokens_ok=True, bits={"f16": 16.0, "q4_k_m": 6.17})
    assert forms[1]["explanation"].startswith("quantization, not a broken export: gguf-f16 from the same converter")
    assert "q4_k_m stores 6.17 bits per weight" in forms[1]["explanation"]
    assert "probe 0 at token 3 (margin 0.8 nats)" in forms[1]["explanation"]
    assert gate_summary(report).splitlines()[:2] == ["export gate: FLAGGED gguf-q4_k_m",
                                                     "  gguf-q4_k_m: " + forms[1]["explanation"]]
    # the same disagreement with the probes tokenized differently: nothing rules out a broken export
    explain_quantization(forms, tokens_ok=False, bits={"q4_k_m": 6.17})
    assert forms[1]["explanation"] is None
    assert gate_summary(report).splitlines()[1].startswith("  gguf-q4_k_m: NOT EXPLAINED, the export may be wrong: "
                                                         "probe 0: greedy differs at token 3")


def test_a_bad_gguf_type_is_a_clear_error(run):
    from qlora_helpers.errors import QLoraError
    from qlora_helpers.serve.gguf import export_gguf

    with pytest.raises(QLoraError, match="Unknown GGUF type 'q2'; valid: f16, q8_0, q5_k_m, q4_k_m"):
        export_gguf(run, ["q2"])
