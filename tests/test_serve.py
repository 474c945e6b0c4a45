"""Stage 06 for real: merge against base + adapter, the batching engine, and the HTTP server on
127.0.0.1 driven by the official openai client (a tiny random LLaMA with a random, non-zero adapter)."""

import json
import time

import pytest

from qlora_helpers.errors import QLoraError
from tests.serve_fixtures import API_KEY, KEY_ENV, SERVER_FORMS, export, run, serve_form  # noqa: F401 - fixtures


def test_merged_logits_match_base_plus_adapter(run, export):
    from qlora_helpers.models import load_tuned_model
    from qlora_helpers.serve import merge_adapter, probe_logits
    from qlora_helpers.serve.export import EXPORT_TOLERANCE, merge_tolerance

    tuned, tokenizer = load_tuned_model(run)
    with_adapter = probe_logits(tuned, tokenizer)
    with tuned.disable_adapter():
        base_only = probe_logits(tuned, tokenizer)
    merged = probe_logits(merge_adapter(run)[0], tokenizer)
    assert (with_adapter - base_only).abs().max() > 0.05  # the adapter really changes the model
    scale = with_adapter.abs().max()
    bound = merge_tolerance(run.compute_dtype)  # 1e-4 in fp32 (CPU); 16-bit bounds are for GPUs
    assert (merged - with_adapter).abs().max() / scale < bound  # the merge keeps exactly that
    # the same check, as merge_and_export recorded it (relative to the logits' scale), and the
    # 16-bit export within bf16 rounding
    assert export["merged_vs_adapter_logits"]["within_bound"]
    assert export["merged_vs_adapter_logits"]["max_relative"] < bound
    assert export["exported_vs_adapter_logits"]["max_relative"] < EXPORT_TOLERANCE
    assert export["exported_vs_adapter_logits"]["same_argmax"] > 0.9


def test_export_layouts_are_what_vllm_and_tgi_load(run, export):
    merged, adapter = run.path / "merged", run.path / "adapter"
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    config = json.loads((merged / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    commands = (run.path / "serve_commands.md").read_text()
    assert f"vllm serve {merged}" in commands and f"--lora-modules serve={adapter}" in commands
    assert "--enable-lora" in commands and "--max-lora-rank 16" in commands


def test_rows_of_a_batch_stop_on_their_own_and_match_single_runs(run, export):
    from qlora_helpers.models import load_tokenizer
    from qlora_helpers.serve import Job, generate_jobs, load_merged

    model, tokenizer = load_merged(run), load_tokenizer(run.cfg.model)
    prompts = ["The capital of France is", "Write a long story about a dragon who", "1, 2, 3,"]

    def jobs(limits):
        return [Job(tokenizer(p)["input_ids"], n, lambda *a: None, ignore_eos=True) for p, n in zip(prompts, limits)]

    batch = jobs([3, 9, 6])
    generate_jobs(model, tokenizer, batch)
    assert [len(j.tokens) for j in batch] == [3, 9, 6]
    assert all(j.finish_reason == "length" for j in batch)
    for job in batch:
        alone = jobs([len(job.tokens)] * 3)[batch.index(job)]
        generate_jobs(model, tokenizer, [alone])
        assert alone.tokens == job.tokens and alone.text == job.text
    # a stop string ends the row before it, and the text never contains it
    half = batch[1].text[len(batch[1].text) // 2:]
    stop = next(half[i:i + 3] for i in range(len(half) - 2) if half[i:i + 3].strip())  # 3 visible characters
    cut = Job(tokenizer(prompts[1])["input_ids"], 9, lambda *a: None, stop=(stop,), ignore_eos=True)
    generate_jobs(model, tokenizer, [cut])
    assert cut.finish_reason == "stop" and stop not in cut.text and batch[1].text.startswith(cut.text)


def test_serve_settings_and_missing_key_are_clear_errors(run, monkeypatch):
    from qlora_helpers.serve import api_key_from_env, open_run_folder

    with pytest.raises(QLoraError, match="Only serve.. settings"):
        open_run_folder(run.path, ["train.learning_rate=1"])
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(QLoraError, match=f"names \\${KEY_ENV}, which is not set"):
        api_key_from_env(run)


@pytest.fixture(scope="module", params=SERVER_FORMS)
def server(request, run, export):
    from qlora_helpers.serve import start_server

    srv = start_server(run, api_key=API_KEY, overrides=serve_form(request))
    yield srv
    srv.stop()


def test_openai_client_completion_chat_and_streaming(server):
    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["serve"]
    done = client.completions.create(model="serve", prompt="The capital of France is", max_tokens=5,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert done.object == "text_completion" and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 5 and done.choices[0].text
    chat = client.chat.completions.create(model="serve", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 4
    events = list(client.chat.completions.create(model="serve", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=4, temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True}))
    streamed = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert streamed == chat.choices[0].message.content
    assert events[-1].choices[0].finish_reason == "length"


def test_n_streamed_choices_come_side_by_side_and_each_equals_its_whole_answer(server):
    """n choices stream interleaved as they are generated, as OpenAI's do; they were sent one after the
    other, so choice 1's first token waited for the whole of choice 0 (4 s for 60 tokens on the CPU)."""
    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
    body = dict(model="serve", prompt="Once upon a time", max_tokens=24, n=2, temperature=1.0, seed=5,
                extra_body={"ignore_eos": True})
    whole = client.completions.create(**body)
    chunks = [c.choices[0] for c in client.completions.create(**body, stream=True) if c.choices]
    order = [c.index for c in chunks]
    assert order.index(1) < len(order) - 1 - order[::-1].index(0), order  # a 1 before the last 0
    assert ["".join(c.text for c in chunks if c.index == i) for i in (0, 1)] == [c.text for c in whole.choices]
    assert sorted((c.index, c.finish_reason) for c in chunks if c.finish_reason) == [(0, "length"), (1, "length")]


def test_stream_chunks_share_created_and_carry_usage_null_until_the_usage_chunk(server):
    """OpenAI: with include_usage every chunk has `usage`, null but in the last (it was left out), and all
    chunks of a stream have the same `created` (it was the second each chunk was made)."""
    import httpx

    body = {"model": "serve", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 200, "n": 2,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["usage"]["completion_tokens"] == 400
    assert chunks[-1]["choices"] == [] and len({c["created"] for c in chunks}) == 1


def test_requests_without_the_key_are_refused(server):
    import httpx
    import openai

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()
    r = httpx.post(f"{server.base_url}/completions", json={"model": "serve", "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # health needs no key
    assert API_KEY not in server.log_path.read_text()


def test_bad_requests_get_a_4xx_json_error(server, run):
    from qlora_helpers.serve import smoke_test

    checks = {c["check"]: c for c in smoke_test(server, "serve")}
    failed = [c for c in checks.values() if not c["ok"]]
    assert not failed, failed
    assert checks["prompt over the context -> 400"]["detail"].startswith("400: This model's context is 256")
    assert checks["huge max_tokens -> 400"]["detail"].startswith("400: max_tokens must be between 1 and 512")


RECORDED_LOAD_TOKENS = 32 * 6  # recorded: the smoke model's greedy answers never meet EOS in 6 tokens


def test_32_concurrent_requests_half_streaming_all_complete_and_correct(server):
    from qlora_helpers.serve import load_test

    result = load_test(server, "serve", n=32, max_tokens=6)
    assert result["problems"] == [] and result["ok"] == 32 and result["streaming"] == 16
    assert all(r["finish_reason"] in ("stop", "length") for r in result["per_request"])
    # recorded (greedy on the smoke model): the tokens served, the same alone and under load
    assert sum(r["completion_tokens"] for r in result["per_request"]) == RECORDED_LOAD_TOKENS
    assert server.health()["completed"] >= 64
    # alone and at once are the same figures (a table of the two has no empty cells)
    assert result["single"].keys() == result["loaded"].keys()
    assert None not in result["single"].values() and None not in result["loaded"].values()
    chat = load_test(server, "serve", n=4, max_tokens=6, chat=True)  # the template-framed requests 06 sends
    assert chat["problems"] == [] and chat["chat"] and chat["single"]["ttft_s_median"] > 0


def test_an_empty_reference_answer_is_a_problem_not_a_pass():
    from qlora_helpers.serve.checks import _answer, compare_answers

    def answer(text, tokens, finish):
        return {"text": text, "completion_tokens": tokens, "finish_reason": finish}

    alone = [answer("", 1, "stop"), answer("Three is odd.", 4, "stop"), answer("Hi", 6, "length")]
    at_once = [{**answer("", 1, "stop"), "index": 0}, {**answer("Three is even.", 4, "stop"), "index": 1},
               {"index": 2, "error": "APITimeoutError: timed out", "stream": True}]
    problems = compare_answers(alone, at_once)
    assert len(problems) == 3
    assert problems[0].startswith("request 0: the answer alone was empty (1 token(s), finish stop)")
    assert "use chat requests" in problems[0]
    assert problems[1] == "request 1: 'Three is even.' != alone 'Three is odd.'"
    assert problems[2] == "request 2: APITimeoutError: timed out"
    assert compare_answers(alone[1:2], [{**alone[1], "index": 0}]) == []
    assert _answer(answer("Paris.", 2, "stop")) == "Paris."
    with pytest.raises(ValueError, match=r"empty answer \(1 token\(s\), finish stop\)"):
        _answer(answer("", 1, "stop"))
    from qlora_helpers.serve import load_test

    off = load_test(None, "serve", n=0, max_tokens=6)  # serve.load_requests: 0 (a pool of 0 threads raises)
    assert (off["requests"], off["ok"], off["problems"], off["off"]) == (0, 0, [], "serve.load_requests is 0")


def test_a_full_queue_answers_503_with_retry_after(run, export):
    import httpx

    from qlora_helpers.serve import start_server

    # one generation at a time, one waiting; long answers (2,000 tokens) keep the first one busy
    body = {"model": "serve", "prompt": "Tell me a story", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    limits = ["serve.max_concurrent=1", "serve.max_queue=1", "serve.context_length=2048", "serve.max_tokens=2000"]
    with start_server(run, api_key=API_KEY, overrides=limits) as srv:
        url = f"{srv.base_url}/completions"
        with httpx.Client(headers=headers, timeout=60) as client, client.stream("POST", url, json=body) as running:
                assert running.status_code == 200
                lines = running.iter_lines()
                assert next(lines).startswith("data:")  # generating now
                with client.stream("POST", url, json=body) as waiting:
                    assert waiting.status_code == 200  # queued (1 of 1)
                    before = srv.health()  # the server's own counters say it is full now
                    assert (before["running"], before["waiting"]) == (1, 1), before
                    full = client.post(url, json={**body, "stream": False})
                    # and no generation ended meanwhile, so the server was still full when it answered
                    assert srv.health()["completed"] == before["completed"], "the first answer ended too soon"
                    assert full.status_code == 503 and int(full.headers["Retry-After"]) >= 1
                    assert full.json()["error"]["code"] == "server_busy"
        # the clients left: their rows are cancelled and give up their places as soon as the server
        # has seen them go (a moment: the disconnects reach its event loop asynchronously)
        deadline = time.monotonic() + 30
        while srv.health()["waiting"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.health()["waiting"] == 0
        ok = httpx.post(url, headers=headers, json={**body, "stream": False, "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
        # more rows than the queue holds is the request's fault: a 400 naming the field (n, not prompt)
        chat = {"model": "serve", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "n": 2}
        two = httpx.post(f"{srv.base_url}/chat/completions", headers=headers, json=chat, timeout=60)
        assert two.status_code == 400 and two.json()["error"]["param"] == "n", two.text
        both = httpx.post(url, headers=headers, json={**body, "stream": False, "prompt": ["a", "b"]}, timeout=60)
        assert both.status_code == 400 and both.json()["error"]["param"] == "prompt", both.text
        assert srv.stop(), (srv.proc.returncode, srv.log_tail())  # SIGTERM: a clean shutdown
        assert not srv.healthy()



@pytest.fixture
def foreign_server():
    """Another HTTP server on 127.0.0.1 that answers /health as ours does, from another process id:
    what a second run's server (or anything else) on the port looks like."""
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"status": "ok", "model": "someone-else", "pid": 1}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def test_a_port_taken_after_it_was_chosen_moves_the_server_and_another_servers_health_never_counts(
        run, export, foreign_server):
    import subprocess
    import sys

    from qlora_helpers.serve.process import PortTaken, ServerProcess

    # chosen while free (serve.port), taken by the time the server starts: two runs started at once
    srv = ServerProcess(run, overrides=["serve.form=merged"], api_key=API_KEY)
    srv.port = foreign_server
    srv.start()
    try:
        assert srv.port != foreign_server and srv.health()["pid"] == srv.proc.pid
    finally:
        assert srv.stop()
    # /health answered on the port by another process is not this launcher's server
    other = ServerProcess(run, port=foreign_server, api_key=API_KEY)
    other.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not other.healthy()
    finally:
        other.proc.kill()
        other.proc.wait()
    # a port the caller named is not silently replaced
    with pytest.raises(PortTaken, match=f"Port {foreign_server} is taken; pick another"):
        ServerProcess(run, port=foreign_server, api_key=API_KEY).start(timeout=30)
