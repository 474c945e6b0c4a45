"""lm-evaluation-harness end to end against the real server: `local-completions` (a loglikelihood
multiple-choice task and a generate_until task, tests/assets/lm_eval) and `local-chat-completions`,
compared with lm-eval's in-process HF model on the same (merged) weights. No hub: local task files,
local data, the merged folder's tokenizer, token-ID requests.

Tolerance: both sides run the same float32 weights on the same CPU; only the shapes of the sums
differ (lm-eval batches and pads, the server prefills each prompt alone), which moves a log-softmax
by ~1e-7 of its size. With log-probabilities of ~10 per token (a random model over 49k tokens) and
a few continuation tokens, that is ~1e-6 per loglikelihood (measured: 9.5e-7 at most); 1e-4 is two
orders above that noise and far below any real difference (a wrong position, token or prompt
logprob moves a loglikelihood by whole units).
"""

import pytest

from qlora_helpers.paths import PROJECT_ROOT
from tests.serve_fixtures import API_KEY, export, run  # noqa: F401 - fixtures

ASSETS = PROJECT_ROOT / "tests" / "assets" / "lm_eval"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def server(run, export):
    from qlora_helpers.serve import start_server

    # the merged weights, which the in-process reference loads too: this checks that the server computes
    # what transformers computes, to 1e-4. (With the [gguf] extra, `auto` would serve the q8_0 GGUF, whose
    # quantization moves loglikelihoods by ~8e-3; its agreement is the export gate's check, test_gguf.py.)
    srv = start_server(run, api_key=API_KEY, overrides=["serve.form=merged"])
    yield srv
    srv.stop()


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """lm-eval reads local files only; the datasets cache lives in the test's folder."""
    monkeypatch.chdir(ASSETS)  # the task YAMLs name qa.jsonl relative to here
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("OPENAI_API_KEY", API_KEY),
                        ("HF_DATASETS_CACHE", str(tmp_path / "datasets"))):
        monkeypatch.setenv(name, value)


def evaluate(model: str, model_args: str, tasks: list[str], **kw) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=True,
                           task_manager=TaskManager(include_path=str(ASSETS)), **kw)


def loglikelihoods(result: dict) -> list[list[float]]:
    samples = sorted(result["samples"]["qlora_tiny_mc"], key=lambda s: s["doc_id"])
    return [[resp[0][0] for resp in s["resps"]] for s in samples]


def generations(result: dict, task: str) -> list[str]:
    return [s["resps"][0][0] for s in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


def test_lm_eval_through_the_server_equals_lm_eval_in_process(server, run, offline):
    merged = run.path / "merged"
    api_args = (f"model=serve,base_url={server.base_url}/completions,tokenizer_backend=huggingface,"
                f"tokenizer={merged},tokenized_requests=True,num_concurrent=2,max_retries=1")
    tasks = ["qlora_tiny_mc", "qlora_tiny_gen"]
    served = evaluate("local-completions", api_args, tasks, batch_size=4)
    local = evaluate("hf", f"pretrained={merged},dtype=float32,device=cpu", tasks, batch_size=4)
    ours, theirs = loglikelihoods(served), loglikelihoods(local)
    gap = max(abs(a - b) for x, y in zip(ours, theirs) for a, b in zip(x, y))
    print(f"\nloglikelihoods, server: {[[round(v, 4) for v in row] for row in ours[:3]]}"
          f"\nloglikelihoods, in-process HF: {[[round(v, 4) for v in row] for row in theirs[:3]]}"
          f"\nlargest gap over {sum(map(len, ours))} choices: {gap:.2e}; acc server "
          f"{served['results']['qlora_tiny_mc']['acc,none']}, "
          f"in process {local['results']['qlora_tiny_mc']['acc,none']}")
    assert len(ours) == 8 and all(len(row) == 3 for row in ours)
    assert gap < TOLERANCE
    assert served["results"]["qlora_tiny_mc"]["acc,none"] == local["results"]["qlora_tiny_mc"]["acc,none"]
    assert generations(served, "qlora_tiny_gen") == generations(local, "qlora_tiny_gen")

    chat_args = f"model=serve,base_url={server.base_url}/chat/completions,num_concurrent=1,max_retries=1"
    chat = evaluate("local-chat-completions", chat_args, ["qlora_tiny_gen"], apply_chat_template=True)
    answers = generations(chat, "qlora_tiny_gen")
    assert len(answers) == 8 and all(isinstance(a, str) for a in answers)
    assert "exact_match,none" in chat["results"]["qlora_tiny_gen"]
