"""The engine alone (no HTTP): rows join and leave a running batch at step boundaries, each row with
its own sampling settings, and every row computes what it computes alone (tiny random LLaMA, CPU)."""

import threading
import time

import pytest

from qlora_helpers.serve.engine import Batch, BatchEngine, Job, generate_jobs
from qlora_helpers.serve.sampling import SamplingParams

PROMPTS = ["The capital of France is", "Write a long story about a dragon who", "1, 2, 3,", "x"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_dir)


def job(tokenizer, prompt, n, **sampling):
    return Job(tokenizer(prompt)["input_ids"], n, lambda *a: None, SamplingParams(**sampling), ignore_eos=True)


def alone(model, tokenizer, prompt, n, **sampling):
    one = job(tokenizer, prompt, n, **sampling)
    generate_jobs(model, tokenizer, [one])
    return one.tokens


def test_alone_equals_transformers_generate(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    for prompt in PROMPTS:
        enc = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=tokenizer.pad_token_id)
        assert alone(model, tokenizer, prompt, 12) == out[0, enc["input_ids"].shape[1]:].tolist()


def test_rows_join_and_leave_between_steps_and_match_their_solo_runs(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    limits = [20, 6, 14, 9]
    reference = [alone(model, tokenizer, p, n) for p, n in zip(PROMPTS, limits)]
    batch, jobs = Batch(model, tokenizer), [job(tokenizer, p, n) for p, n in zip(PROMPTS, limits)]
    batch.add(jobs[0])
    batch.step(), batch.step()
    batch.add(jobs[1])  # joins a running row, with a longer prompt (the cache is re-padded)
    for _ in range(7):
        batch.step()
    assert jobs[1].finish_reason == "length" and jobs[1] not in batch.jobs  # left while 0 runs on
    batch.add(jobs[2]), batch.add(jobs[3])
    while batch.jobs:
        batch.step()
    assert [j.tokens for j in jobs] == reference
    assert batch.cache is None and batch.mask is None


def test_rows_with_different_sampling_share_a_step(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    settings = [dict(temperature=0.9, top_p=0.8, top_k=40, seed=7), dict(),
                dict(temperature=1.3, seed=11, frequency_penalty=0.5, presence_penalty=0.3),
                dict(repetition_penalty=1.3)]
    reference = [alone(model, tokenizer, p, 10, **s) for p, s in zip(PROMPTS, settings)]
    batch, jobs = Batch(model, tokenizer), [job(tokenizer, p, 10, **s) for p, s in zip(PROMPTS, settings)]
    batch.add(jobs[1])
    batch.step()
    for j in (jobs[0], jobs[2], jobs[3]):
        batch.add(j)
    while batch.jobs:
        batch.step()
    assert [j.tokens for j in jobs] == reference
    # the seed decides: same seed, same tokens; another seed, other tokens
    assert alone(model, tokenizer, PROMPTS[0], 10, **settings[0]) == reference[0]
    assert alone(model, tokenizer, PROMPTS[0], 10, **{**settings[0], "seed": 8}) != reference[0]


def test_penalties_follow_openai_and_transformers():
    import torch

    from qlora_helpers.serve.sampling import penalize

    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    same = penalize(logits, SamplingParams(), [0], [1, 1])
    assert torch.equal(same, logits)
    # OpenAI: logit - count * frequency_penalty - presence_penalty, over generated tokens only
    got = penalize(logits, SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), [0], [1, 1, 2])
    assert got.tolist() == [[2.0, -3.25, 0.25, 0.5]]
    # transformers/vLLM: positive logits divided, negative multiplied, prompt tokens included
    got = penalize(logits, SamplingParams(repetition_penalty=2.0), [0], [1])
    assert got.tolist() == [[1.0, -4.0, 1.0, 0.5]]


def test_a_tiny_temperature_or_repetition_penalty_samples_its_limit_and_fails_no_row(model_and_tokenizer):
    """temperature 1e-38 (1e-300 is 0 in float32) or repetition_penalty 1e-39 pushed the scores to inf,
    and inf - inf is NaN: multinomial raised, a 500 for the request and, in a decode step, for every
    row sharing it. The limit of a tiny temperature is the greedy answer."""
    model, tokenizer = model_and_tokenizer
    greedy = alone(model, tokenizer, PROMPTS[0], 8)
    for temperature in (1e-38, 1e-300, 5e-324):
        assert alone(model, tokenizer, PROMPTS[0], 8, temperature=temperature, seed=1) == greedy
    batch = Batch(model, tokenizer)
    rows = [job(tokenizer, PROMPTS[1], 8), job(tokenizer, PROMPTS[0], 8, temperature=1.0, repetition_penalty=1e-39)]
    for row in rows:
        batch.add(row)
    while batch.jobs:
        batch.step()
    assert [len(r.tokens) for r in rows] == [8, 8]
    assert rows[0].tokens == alone(model, tokenizer, PROMPTS[1], 8)


def test_min_tokens_holds_eos_back_and_logprobs_are_the_models(model_and_tokenizer):
    import torch

    model, tokenizer = model_and_tokenizer
    ids = tokenizer(PROMPTS[0])["input_ids"]
    one = Job(ids, 3, lambda *a: None, SamplingParams(logprobs=2, prompt_logprobs=True))
    generate_jobs(model, tokenizer, [one])
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([ids + one.tokens])).logits[0].float(), -1)
    assert one.prompt_logprobs[0] is None and len(one.prompt_logprobs) == len(ids)
    for i, entry in enumerate(one.prompt_logprobs[1:]):
        assert entry["logprob"] == pytest.approx(float(full[i, ids[i + 1]]), abs=1e-4)
    for i, entry in enumerate(one.logprobs):
        assert entry["logprob"] == pytest.approx(float(full[len(ids) - 1 + i, one.tokens[i]]), abs=1e-4)
        assert len(entry["top"]) == 2 and entry["top"][0][1] >= entry["logprob"] - 1e-6
    # EOS as the most likely token: min_tokens keeps the row going
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
        model.lm_head.bias[eos] = 1e4
        try:
            stopped = Job(ids, 5, lambda *a: None)
            held = Job(ids, 5, lambda *a: None, SamplingParams(min_tokens=3))
            generate_jobs(model, tokenizer, [stopped, held])
        finally:
            model.lm_head.bias = None
    assert stopped.tokens == [] and stopped.finish_reason == "stop"
    assert len(held.tokens) == 3 and held.finish_reason == "stop"


def test_the_engine_thread_lets_a_short_request_overtake_a_long_one(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = BatchEngine(model, tokenizer, max_batch=4, max_queue=4).start()
    started, finished, order = threading.Event(), [threading.Event(), threading.Event()], []

    def emit_for(i):
        def emit(kind, payload):
            if kind == "text":
                started.set()
            elif kind in ("done", "error"):
                order.append(i)
                finished[i].set()
        return emit

    try:
        long = Job(tokenizer(PROMPTS[1])["input_ids"], 300, emit_for(0), ignore_eos=True)
        engine.submit(long)
        assert started.wait(60)  # the long one is generating
        short = Job(tokenizer(PROMPTS[0])["input_ids"], 5, emit_for(1), ignore_eos=True)
        engine.submit(short)
        assert finished[1].wait(60)
        assert order == [1] and long.finish_reason is None  # the short one did not wait for the long one
        long.cancelled = True
        assert finished[0].wait(60) and long.finish_reason == "cancelled" and len(long.tokens) < 300
    finally:
        engine.stop()
    assert engine.completed == 2 and short.tokens == alone(model, tokenizer, PROMPTS[0], 5)


def test_a_job_whose_prefill_fails_ends_alone_with_an_error(model_and_tokenizer, caplog):
    model, tokenizer = model_and_tokenizer
    caplog.set_level("ERROR", logger="qlora_helpers.serve")
    engine = BatchEngine(model, tokenizer, max_batch=4, max_queue=4).start()
    ended = {}
    events = {name: threading.Event() for name in ("good", "bad")}

    def emit_for(name):
        def emit(kind, payload):
            if kind in ("done", "error"):
                ended[name] = (kind, payload)
                events[name].set()
        return emit

    try:
        good = Job(tokenizer(PROMPTS[0])["input_ids"], 6, emit_for("good"), ignore_eos=True)
        bad = Job([model.config.vocab_size + 5], 6, emit_for("bad"))  # no such token: the embedding fails
        engine.submit(good), engine.submit(bad)
        assert events["good"].wait(60) and events["bad"].wait(60)
    finally:
        engine.stop()
    assert ended["bad"][0] == "error" and "generation failed" in ended["bad"][1]
    assert ended["good"] == ("done", "length") and good.tokens == alone(model, tokenizer, PROMPTS[0], 6)
    # the server log says why (the request log line alone says only 500)
    failed = [r for r in caplog.records if r.name == "qlora_helpers.serve" and r.exc_info]
    assert len(failed) == 1 and "prefill failed" in failed[0].getMessage()


def sentencepiece_tokenizer():
    """A LLaMA-2-style fast tokenizer (SentencePiece BPE with byte fallback; its decoder drops the space
    that starts a text), with a few words: enough to decode what the engine generates."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for word in ("\u2581The", "\u2581capital", "\u2581is", "\u2581Paris", "."):
        vocab[word] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_a_sentencepiece_answer_keeps_its_first_space_and_its_tokens_bytes():
    from qlora_helpers.serve.batch import advance
    from qlora_helpers.serve.responses import token_bytes

    tokenizer = sentencepiece_tokenizer()
    word = tokenizer.convert_tokens_to_ids
    prompt = [1, word("\u2581The"), word("\u2581capital"), word("\u2581is")]
    assert tokenizer.decode([word("\u2581Paris")]) == "Paris"  # alone, the decoder drops the space
    sent = []
    row = Job(prompt, 8, lambda kind, payload: sent.append((kind, payload)))
    unicorn = [word(f"<0x{b:02X}>") for b in "\U0001f984".encode()]
    for token in [word("\u2581Paris"), word("."), *unicorn, tokenizer.eos_token_id]:
        advance(row, token, tokenizer, None)
    assert row.text == " Paris.\U0001f984" and row.finish_reason == "stop" and row.generated == 7
    assert "".join(p[0] for k, p in sent if k == "text") == " Paris.\U0001f984"
    assert token_bytes(tokenizer, word("\u2581Paris")) == b" Paris" and token_bytes(tokenizer, unicorn[0]) == b"\xf0"
    assert b"".join(token_bytes(tokenizer, t) for t in unicorn).decode() == "\U0001f984"


def test_retry_after_leaves_out_the_time_the_engine_sat_idle():
    """After 90 s idle, a burst that filled a queue draining in ~2 s was told Retry-After: 26."""
    from qlora_helpers.serve.engine import QueueFull

    class NoModel:  # the engine is not started: only its queue is tested
        def new_batch(self, tokenizer):
            return type("Rows", (), {"jobs": []})()

    engine = BatchEngine(NoModel(), None, max_batch=1, max_queue=1)
    now = time.perf_counter()
    engine.finished_at.extend(now - 100 + i for i in range(10))  # a busy period ending 90 s ago
    engine.submit(Job([1], 1, lambda *a: None))  # busy from now on, nothing finished since
    with pytest.raises(QueueFull) as full:
        engine.submit(Job([1], 1, lambda *a: None))
    assert full.value.retry_after == 2  # the fallback: 2 rounds of ~1 s jobs, not 1 x 100 s / 10 = 10


def test_a_failed_choice_ends_the_whole_non_streaming_request_and_cancels_its_other_rows():
    """n > 1 without streaming: one row's error was a 500 while the other rows generated on for nobody."""
    import asyncio

    from qlora_helpers.serve.middleware import APIError
    from qlora_helpers.serve.relay import Events, collect

    class Client:  # still there
        async def is_disconnected(self):
            return False

    async def run():
        loop = asyncio.get_running_loop()
        jobs = [Job([1], 100, Events(loop)) for _ in range(3)]
        jobs[0].emit("text", ("Once", []))
        jobs[0].emit("done", "length")
        jobs[1].emit("error", "generation failed: RuntimeError: boom")
        with pytest.raises(APIError) as failed:
            await collect(Client(), jobs)
        return jobs, failed.value

    jobs, error = asyncio.run(run())
    assert error.status == 500 and error.code == "generation_failed"
    assert [j.cancelled for j in jobs] == [True, True, True]


def test_retry_afters_fallback_counts_each_jobs_run_time_not_its_wait(model_and_tokenizer):
    """The fallback is rounds of waiting x a job's seconds; those seconds counted the time the job had
    waited in the queue too, so a full queue was counted twice (64 waiting 60 s for 5 s jobs: 585 s)."""
    model, tokenizer = model_and_tokenizer
    engine = BatchEngine(model, tokenizer, max_batch=1, max_queue=4).start()
    finished = [threading.Event() for _ in range(3)]
    jobs = [Job(tokenizer(PROMPTS[0])["input_ids"], 30, lambda kind, payload, i=i: kind == "done" and finished[i].set(),
                ignore_eos=True) for i in range(3)]
    try:
        for one in jobs:  # one at a time: the second and third wait for the ones before
            engine.submit(one)
        assert all(f.wait(120) for f in finished)
    finally:
        engine.stop()
    expected = 1.0
    for one in sorted(jobs, key=lambda j: j.done_at):
        expected = 0.7 * expected + 0.3 * (one.done_at - one.first_token_at)
    assert jobs[2].first_token_at - jobs[2].submitted > jobs[0].done_at - jobs[0].first_token_at  # it waited
    assert engine._job_seconds == pytest.approx(expected, rel=1e-9)
