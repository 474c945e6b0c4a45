"""The static-slot decoder (qlora_helpers/serve/static.py) computes what the dynamic path computes:
rows of different prompt lengths join and leave mid-generation, in fixed slots with per-row write
columns, eager on the CPU (tiny random LLaMA); on CUDA (marked gpu) the compiled step against the
dynamic path, and the server compiling every bucket at start."""

import os

import pytest
import torch

from qlora_helpers.serve.engine import Batch, BatchEngine, Job, generate_jobs
from qlora_helpers.serve.sampling import SamplingParams
from qlora_helpers.serve.static import StaticBatch, StaticDecoder, batch_buckets
from tests.serve_fixtures import API_KEY, run  # noqa: F401 - fixtures

PROMPTS = ["The capital of France is", "Write a long story about a dragon who", "1, 2, 3,", "x",
           "Once upon a time in a land far away there lived"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_dir)


def job(tokenizer, prompt, n, logprobs=1, **sampling):
    return Job(tokenizer(prompt)["input_ids"], n, lambda *a: None, SamplingParams(logprobs=logprobs, **sampling),
               ignore_eos=True)


def jobs_for(tokenizer, limits):
    """Odd rows report logprobs (chosen per row); even rows are plain greedy (the batched argmax)."""
    return [job(tokenizer, p, n, logprobs=1 if i % 2 else None) for i, (p, n) in enumerate(zip(PROMPTS, limits))]


def assert_same_rows(static, dynamic, abs_logprob):
    for d, s in zip(dynamic, static):
        assert s.finish_reason == d.finish_reason == "length"
        assert s.tokens == d.tokens and len(s.logprobs) == len(d.logprobs)
        assert [e["logprob"] for e in s.logprobs] == pytest.approx([e["logprob"] for e in d.logprobs], abs=abs_logprob)


def drive(batch, jobs):
    """The same schedule on either batch: rows join and leave between steps."""
    batch.add(jobs[0])
    batch.step(), batch.step()
    batch.add(jobs[1])  # a longer prompt joins a running row
    for _ in range(3):
        batch.step()
    batch.add(jobs[2]), batch.add(jobs[3])  # two join together (prefilled together on the static path)
    for _ in range(4):
        batch.step()
    assert jobs[1].finish_reason == "length"  # left while others run on
    batch.add(jobs[4])
    while batch.jobs or getattr(batch, "joining", []):
        batch.step()


def test_batch_buckets():
    assert batch_buckets(1) == (1,) and batch_buckets(8) == (1, 2, 4, 8) and batch_buckets(6) == (1, 2, 4, 6)


def test_static_slots_match_the_dynamic_path_as_rows_join_and_leave(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    limits = [24, 5, 14, 9, 7]
    dynamic = jobs_for(tokenizer, limits)
    drive(Batch(model, tokenizer), dynamic)
    decoder = StaticDecoder(model, slots=4, max_len=48)
    assert not decoder.compiled  # the CPU: eager
    static = jobs_for(tokenizer, limits)
    batch = StaticBatch(model, tokenizer, decoder)
    drive(batch, static)
    assert_same_rows(static, dynamic, 1e-4)
    assert len(static[1].logprobs) == len(static[1].tokens) == 5 and static[0].logprobs == []
    assert batch.jobs == [] and batch.joining == []


def test_overlapped_steps_give_what_one_step_at_a_time_gives(model_and_tokenizer, monkeypatch):
    # all rows plain greedy: each step after the first is launched before the host reads the one
    # before it, with the argmax left on the device as its input, while rows join and leave
    model, tokenizer = model_and_tokenizer
    limits = [24, 5, 14, 9, 7]
    runs = {}
    for overlap in (False, True):
        monkeypatch.setattr(StaticBatch, "overlap", overlap)
        jobs = [job(tokenizer, p, n, logprobs=None) for p, n in zip(PROMPTS, limits)]
        batch = StaticBatch(model, tokenizer, StaticDecoder(model, slots=4, max_len=48))
        drive(batch, jobs)
        assert (batch.ahead is not None) == overlap  # the last rows' extra step, never read
        runs[overlap] = [j.tokens for j in jobs]
    assert runs[True] == runs[False] and [len(t) for t in runs[True]] == limits


def test_static_rows_match_their_solo_runs_with_sampling_and_prompt_logprobs(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    settings = [dict(), dict(temperature=0.8, top_p=0.9, seed=3), dict(repetition_penalty=1.3),
                dict(prompt_logprobs=True)]
    dynamic = [job(tokenizer, p, 6, **s) for p, s in zip(PROMPTS, settings)]
    for one in dynamic:
        generate_jobs(model, tokenizer, [one])
    decoder = StaticDecoder(model, slots=4, max_len=32)
    static = [job(tokenizer, p, 6, **s) for p, s in zip(PROMPTS, settings)]
    generate_jobs(model, tokenizer, static, decoder)  # all four share the slots
    for d, s in zip(dynamic, static):
        assert s.tokens == d.tokens
    got, want = static[3].prompt_logprobs, dynamic[3].prompt_logprobs
    assert got[0] is None and len(got) == len(want)
    assert [e["logprob"] for e in got[1:]] == pytest.approx([e["logprob"] for e in want[1:]], abs=1e-4)


def test_rows_whose_answers_would_not_fit_after_a_longer_prompt_are_prefilled_apart(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    long, short = (tokenizer(PROMPTS[i])["input_ids"] for i in (1, 3))
    columns = len(long) + 3
    limits = [3, columns - len(short)]  # the short prompt's answer fills the columns from its own end
    assert len(long) + limits[1] > columns  # so after the long prompt's width it would not fit
    alone = []
    for ids, n in zip((long, short), limits):
        alone.append(Job(ids, n, lambda *a: None, ignore_eos=True))
        generate_jobs(model, tokenizer, [alone[-1]])
    together = [Job(ids, n, lambda *a: None, ignore_eos=True) for ids, n in zip((long, short), limits)]
    generate_jobs(model, tokenizer, together, StaticDecoder(model, slots=2, max_len=columns))
    assert [j.tokens for j in together] == [j.tokens for j in alone]
    assert [len(j.tokens) for j in together] == limits


def test_static_batch_refuses_what_does_not_fit(model_and_tokenizer):
    from qlora_helpers.errors import QLoraError

    model, tokenizer = model_and_tokenizer
    batch = StaticBatch(model, tokenizer, StaticDecoder(model, slots=1, max_len=16))
    with pytest.raises(QLoraError, match="exceeds the static cache's 16 columns"):
        batch.add(job(tokenizer, PROMPTS[0], 20))
    with pytest.raises(QLoraError, match="token ids"):
        batch.add(Job([model.config.vocab_size + 5], 2, lambda *a: None))
    batch.add(job(tokenizer, PROMPTS[0], 2))
    with pytest.raises(QLoraError, match="no free slot"):
        batch.add(job(tokenizer, PROMPTS[2], 2))


def test_the_engine_serves_from_static_slots_and_reports_them(model_and_tokenizer):
    import threading

    model, tokenizer = model_and_tokenizer
    decoder = StaticDecoder(model, slots=2, max_len=40)
    warm = decoder.warm_up()
    engine = BatchEngine(model, tokenizer, max_batch=2, max_queue=8, decoder=decoder).start()
    jobs, ended = [], []
    all_done = threading.Event()

    def emit(kind, payload):
        if kind in ("done", "error"):
            ended.append(kind)
            if len(ended) == 4:
                all_done.set()

    try:
        for p, n in zip(PROMPTS, [9, 3, 6, 4]):  # four requests through two slots
            jobs.append(Job(tokenizer(p)["input_ids"], n, emit, ignore_eos=True))
            engine.submit(jobs[-1])
        assert all_done.wait(120)
        stats = engine.stats()
    finally:
        engine.stop()
    assert ended == ["done"] * 4 and stats["decode"] == "static" and stats["batch_buckets"] == [1, 2]
    assert stats["compile_cache"] == "off"  # nothing compiled on the CPU, so nothing cached
    assert warm >= 0 and set(stats["compile_warmup_s_per_bucket"]) == {"1", "2"}
    for p, n, one in zip(PROMPTS, [9, 3, 6, 4], jobs):
        alone = job(tokenizer, p, n)
        generate_jobs(model, tokenizer, [alone])
        assert one.tokens == alone.tokens


def test_the_step_compiled_on_the_cpu_matches_the_dynamic_path(model_and_tokenizer):
    # Inductor's CPU backend: the same rows as the dynamic path
    model, tokenizer = model_and_tokenizer
    limits = [9, 3, 6, 4, 5]
    dynamic = jobs_for(tokenizer, limits)
    drive(Batch(model, tokenizer), dynamic)
    torch._dynamo.reset()
    decoder = StaticDecoder(model, slots=4, max_len=64, compile=True, tune=False)
    try:
        decoder.warm_up()
        static = jobs_for(tokenizer, limits)
        drive(StaticBatch(model, tokenizer, decoder), static)
    finally:
        torch._dynamo.reset()
    assert_same_rows(static, dynamic, 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_compiled_step_on_cuda_matches_the_dynamic_path(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).cuda().eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    limits = [20, 6, 11, 8]

    def two_at_a_time(batch, jobs):  # rows join and leave; at most two at once
        batch.add(jobs[0])
        batch.step(), batch.step()
        batch.add(jobs[1])
        while jobs[1].finish_reason is None:
            batch.step()
        batch.add(jobs[2])
        batch.step()
        while len(batch.jobs) == 2:
            batch.step()
        batch.add(jobs[3])
        while batch.jobs or getattr(batch, "joining", []):
            batch.step()

    dynamic = jobs_for(tokenizer, limits)
    two_at_a_time(Batch(model, tokenizer), dynamic)
    decoder = StaticDecoder(model, slots=2, max_len=64)
    assert decoder.compiled and decoder.buckets == (1, 2)
    assert decoder.warm_up() > 0 and set(decoder.warmup_s) == {1, 2}
    static = jobs_for(tokenizer, limits)
    two_at_a_time(StaticBatch(model, tokenizer, decoder), static)
    assert_same_rows(static, dynamic, 1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_server_compiles_every_bucket_at_start_and_reports_it(run):
    import httpx

    from qlora_helpers.serve import start_server

    # the 4-bit base + adapter, as served on cards where the merged model does not fit
    server = start_server(run, api_key=API_KEY, overrides=["serve.max_concurrent=2", "serve.form=adapter"])
    try:
        health = server.health()
        answer = httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                            json={"model": health["model"], "prompt": PROMPTS[0], "max_tokens": 7,
                                  "temperature": 0, "ignore_eos": True}, timeout=120).json()
    finally:
        server.stop()
    assert health["form"] == "adapter" and health["decode"] == "static, compiled"
    assert health["batch_buckets"] == [1, 2]
    assert health["compile_warmup_s"] > 0 and set(health["compile_warmup_s_per_bucket"]) == {"1", "2"}
    assert health["compile_cache"] in ("hit", "miss")  # the model cache's compile folder was used
    assert answer["usage"]["completion_tokens"] == 7 and answer["choices"][0]["finish_reason"] == "length"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_merge_check_passes_in_16_bit_compute_on_cuda(run):
    # on CUDA the run computes in bf16 (fp16 without bf16): the merged weights are rounded where the
    # adapter path is not, so the check's bound is the compute dtype's (it refused every merge at 1e-4)
    from qlora_helpers.serve import merge_and_export
    from qlora_helpers.serve.export import merge_tolerance

    report = merge_and_export(run)
    gap = report["merged_vs_adapter_logits"]
    assert run.device == "cuda" and run.runtime.compute_dtype in ("bfloat16", "float16")
    assert gap["bound"] == merge_tolerance(run.compute_dtype) and gap["within_bound"], gap
    assert gap["same_argmax"] > 0.9 and run.has_merged


def test_the_compile_cache_file_is_keyed_by_what_changes_the_compiled_step(model_and_tokenizer, tmp_path,
                                                                          monkeypatch):
    from qlora_helpers.serve.compile_cache import CompileCache, cache_key

    model, _ = model_and_tokenizer
    base = dict(model=model, dtype=torch.bfloat16, slots=4, max_len=64, buckets=(1, 2, 4),
                options={"triton.cudagraphs": True})
    digest = CompileCache(tmp_path, cache_key(**base)).digest
    assert CompileCache(tmp_path, cache_key(**base)).digest == digest  # the same decoder: the same file
    for change in (dict(slots=8), dict(max_len=128), dict(buckets=(1, 4)), dict(dtype=torch.float16),
                   dict(options={"triton.cudagraphs": True, "coordinate_descent_tuning": True})):
        assert CompileCache(tmp_path, cache_key(**{**base, **change})).digest != digest, change
    cache = CompileCache(tmp_path, cache_key(**base))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # load() sets it for this process
    state = cache.load()  # Inductor's own folder (the tuned configs) beside the file, keyed the same
    assert state["state"] == "miss" and state["inductor_dir"] == str(tmp_path / f"inductor-{digest}")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == state["inductor_dir"] and cache.inductor_dir.is_dir()
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    cache_dir()  # torch sets the variable to its default the first time it looks: still ours
    assert cache.load()["inductor_dir"] == str(tmp_path / f"inductor-{digest}")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "yours"))  # a folder the user chose stays
    assert cache.load()["inductor_dir"] == str(tmp_path / "yours")
    cache.file.write_bytes(b"not torch's artefacts")
    state = cache.load()
    assert state["state"] == "unreadable" and state["error"]  # a broken file costs a cold compile, not the server


def test_a_torch_that_re_tunes_at_every_start_is_named_at_the_start():
    from qlora_helpers.serve.compile_cache import retune_note

    for old in ("2.11.0+cu130", "2.9.1", "2.4.0"):  # pytorch#172819: fixed in 2.12
        assert "pytorch#172819" in retune_note(old) and old in retune_note(old)
    for fixed in ("2.12.0", "2.13.0+cpu", "3.0.0"):
        assert retune_note(fixed) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_second_decoder_loads_the_compile_cache_the_first_saved(tiny_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # warm_up points it beside the file
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).cuda().eval()
    first = StaticDecoder(model, slots=2, max_len=32)
    first.warm_up(tmp_path)
    assert first.compile_cache["state"] == "miss" and first.compile_cache["saved"]
    assert first.describe()["compile_cache"] == "miss" and len(list(tmp_path.glob("step-*.bin"))) == 1
    torch._dynamo.reset()
    second = StaticDecoder(model, slots=2, max_len=32)
    second.warm_up(tmp_path)
    assert second.compile_cache["state"] == "hit" and second.compile_cache["entries"] > 0
    assert second.describe()["compile_cache"] == "hit"
