import math

import pytest
import torch

from qlora_helpers.config import load_config
from qlora_helpers.evaluate import extract_final_number, gsm8k_exact_match, lm_eval_local_tasks, rouge_l
from qlora_helpers.scoring import heldout_loss


@pytest.mark.parametrize("text,expected", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("The answer is 42.", "42"),
    ("It costs $3.50 in total", "3.5"),
    ("So 10 - 3 = 7 apples, i.e. 7.0", "7"),
    ("#### -5", "-5"),
    ("no numbers here", None),
])
def test_final_number_extraction(text, expected):
    assert extract_final_number(text) == expected


def test_gsm8k_exact_match():
    answers = ["Steps...\n#### 18", "Steps...\n#### 3", "Steps...\n#### 1000"]
    result = gsm8k_exact_match(["I think 18.", "The answer is 4", "#### 1,000"], answers)
    assert result["per_example"] == [True, False, True]
    assert result["exact_match"] == pytest.approx(2 / 3)


def test_rouge_l_by_hand():
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"])["rougeL_f1"] == 1.0
    assert rouge_l(["dogs bark loudly"], ["the cat sat"])["rougeL_f1"] == 0.0
    # LCS 5 of 5 predicted and 6 reference tokens: P=1, R=5/6, F=2PR/(P+R)
    assert rouge_l(["the cat on the mat"], ["the cat sat on the mat"])["rougeL_f1"] == pytest.approx(10 / 11)


class _Uniform(torch.nn.Module):
    """A language model that gives every token of a V-word vocabulary the same probability."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab) + self.anchor
        return type("Out", (), {"logits": logits})()


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    result = heldout_loss(_Uniform(len(tok)), tok, [("Say:", " hello there"), ("Count:", " one two three")],
                          batch_size=2, max_length=64, template="alpaca")
    assert result["perplexity"] == pytest.approx(len(tok), rel=1e-5)
    assert result["loss"] == pytest.approx(math.log(len(tok)), rel=1e-6)


def test_batched_generation_equals_one_by_one(embedded_dir):
    from qlora_helpers.generation import generate
    from qlora_helpers.models import load_model, load_tokenizer
    from qlora_helpers.prompts import encode_prompts

    cfg = load_config("default")
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, cfg.quant, torch.float32, "cpu", quantized=False)
    prompts = encode_prompts("alpaca", tok, ("Name a colour.", "What is 2 + 2? Answer briefly.",
                                             "Write one sentence about the sea and the wind at night."))
    batched = generate(model, tok, prompts, max_new_tokens=16, batch_size=3)
    single = [generate(model, tok, [p], max_new_tokens=16, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(text.strip() for text in batched)


def test_lm_eval_local_gsm8k_task_runs_offline(tmp_path, tiny_dir):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_helpers.opening import setup_run

    run = setup_run("smoke", "lm-eval", ["train.wandb=disabled"], str(tmp_path))
    assert lm_eval_local_tasks(run, tmp_path / "tasks") == ["gsm8k_local"]
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(tiny_dir), batch_size=2, max_length=256)
    out = simple_evaluate(model=lm, tasks=["gsm8k_local"], limit=2, log_samples=False,
                          task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    metrics = out["results"]["gsm8k_local"]
    # recorded: random weights solve neither of the 2 problems, under either of lm-eval's answer filters
    assert metrics["exact_match,strict-match"] == 0.0 and metrics["exact_match,flexible-extract"] == 0.0
    assert out["n-samples"]["gsm8k_local"] == {"original": 6, "effective": 2}  # tests/assets: 6 problems


def test_a_task_without_data_is_skipped_and_recorded(tmp_path, tiny_dir, monkeypatch, capsys):
    """Hub unreachable, no offline copy: 05 skips that task with the reason and keeps the others."""
    import json

    from qlora_helpers.evaluate import evaluate_ifeval, evaluate_showcase, headline, write_eval_report
    from qlora_helpers.opening import setup_run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = setup_run("smoke", "no-data", ["train.wandb=disabled", "eval.ifeval_path=google/IFEval",
                                         "eval.mt_bench_path=missing/questions.jsonl"], str(tmp_path))
    ifeval = evaluate_ifeval(run, None, None)  # skipped before any model is needed
    assert set(ifeval) == {"skipped"} and "'google/IFEval'" in ifeval["skipped"]
    assert "tests/assets/data has no eval/ifeval/input_data.jsonl" in ifeval["skipped"]
    showcase = evaluate_showcase(run, None, None)
    assert "missing/questions.jsonl does not exist" in showcase["skipped"]
    assert "evaluate_ifeval: skipped, no data" in capsys.readouterr().out
    assert headline(ifeval, "prompt_level_strict").startswith("skipped: Cannot load hub dataset 'google/IFEval'")
    report = write_eval_report(run, ifeval=ifeval, showcase=showcase)
    assert json.loads(run.eval_report.read_text())["skipped"] == report["skipped"]
    assert set(report["skipped"]) == {"ifeval", "showcase"} and report["summary"] == {}
    assert report["samples"]["ifeval"] == 0 and report["overrides"] == []
    # 05's own eval.* change (its eval_overrides) is recorded in the report beside the config it made
    from qlora_helpers.opening import open_run

    evaluated = open_run("no-data", str(tmp_path), ["eval.answer_samples=3"], stage="05")
    report = write_eval_report(evaluated, ifeval=ifeval)
    assert report["overrides"] == ["eval.answer_samples=3"] and report["config"]["eval"]["answer_samples"] == 3
    # the summary's intervals are the answer task's own: one bootstrap seed (data.seed, recorded as "seed")
    from qlora_helpers.answers import score_answers
    from qlora_helpers.decoding import Answer

    words = ["the", "cat", "sat", "on", "a", "mat", "and", "the", "dog", "ran", "far", "away", "from", "it"]
    texts = ([" ".join(words[i % 7:i % 7 + 2 + i % 5] * (1 + i % 3)) for i in range(40)],
             [" ".join(words[i % 5:i % 5 + 3 + i % 4]) for i in range(40)])
    base, tuned = ([Answer(t, len(t.split()), (i * k) % 3 == 0) for i, t in enumerate(side)]
                   for k, side in enumerate(texts, start=1))
    refs, seed = [" ".join(words[i % 6:i % 6 + 4]) for i in range(40)], evaluated.cfg.data.seed
    answers = score_answers(base, tuned, refs, seed=seed)
    report = write_eval_report(evaluated, answers=answers)
    summary = {r["metric"]: r for r in report["differences"]}
    assert seed != 0 and report["seed"] == seed
    for row in answers["differences"]:
        assert (summary[row["metric"]]["low"], summary[row["metric"]]["high"]) == (row["low"], row["high"])


def test_paired_bootstrap_on_known_inputs():
    from qlora_helpers.scoring import paired_bootstrap

    # one of four examples flips from wrong to right: the resampled count of flips is Binomial(4, 1/4),
    # so the 2.5% and 97.5% points of the mean difference are 0 and 3/4: zero is inside
    r = paired_bootstrap([0, 0, 0, 0], [1, 0, 0, 0])
    assert (r["difference"], r["low"], r["high"], r["n"]) == (0.25, 0.0, 0.75, 4)
    assert not r["distinguishable"]
    # the same shift on every example: every resample sees exactly that shift
    r = paired_bootstrap([0.1, 0.5, 0.9, 0.3], [1.1, 1.5, 1.9, 1.3])
    assert r["difference"] == pytest.approx(1.0) and r["low"] == pytest.approx(1.0) and r["distinguishable"]
    base, tuned = [0, 1, 0, 1, 1], [1, 1, 0, 0, 1]
    assert paired_bootstrap(base, tuned, seed=3) == paired_bootstrap(base, tuned, seed=3)


def test_paired_bootstrap_pairs_examples():
    """Big differences between examples, a small consistent gain: paired, the gain shows."""
    import random

    from qlora_helpers.scoring import paired_bootstrap

    rng = random.Random(0)
    base = [rng.uniform(0, 1) for _ in range(40)]
    tuned = [b + 0.05 + rng.uniform(-0.01, 0.01) for b in base]
    r = paired_bootstrap(base, tuned)
    assert r["distinguishable"] and 0.04 < r["low"] < r["difference"] < r["high"] < 0.06


def test_paired_bootstrap_weights_and_transform():
    import math

    from qlora_helpers.scoring import paired_bootstrap

    # per-example mean losses weighted by token counts: the token-weighted loss difference
    base, tuned, tokens = [2.0, 1.0], [1.0, 1.0], [3, 1]
    r = paired_bootstrap(base, tuned, tokens)
    assert r["difference"] == pytest.approx((1.0 * 3 + 1.0) / 4 - (2.0 * 3 + 1.0) / 4)
    ppl = paired_bootstrap(base, tuned, tokens, math.exp)
    assert ppl["difference"] == pytest.approx(math.exp(1.0) - math.exp(1.75))
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap([1, 2], [1])


def test_compare_paired_says_in_words_whether_it_is_real():
    from qlora_helpers.evaluate import compare_paired

    results = {
        "loss": {"base": {"per_example": [[20.0, 10]] * 30}, "tuned": {"per_example": [[15.0, 10]] * 30}},
        "answers": {"base": {"per_example": {"ROUGE-L F1": [0.2, 0.3, 0.1, 0.4]}},
                    "tuned": {"per_example": {"ROUGE-L F1": [0.3, 0.2, 0.1, 0.4]}}},  # the other answer metrics absent
        "gsm8k": {"base": {"per_example": [False] * 4}, "tuned": {"per_example": [False] * 4}},
        "ifeval": {"base": {"per_prompt": [[1, 2, 2], [0, 0, 1]]}, "tuned": {"per_prompt": [[1, 2, 2], [1, 1, 1]]}},
    }
    rows = {r["metric"]: r for r in compare_paired(results)}
    assert set(rows) == {"held-out loss", "perplexity", "ROUGE-L F1", "GSM8K exact match",
                         "IFEval prompt-level", "IFEval instruction-level"}
    assert rows["held-out loss"]["difference"] == pytest.approx(-0.5)
    assert rows["held-out loss"]["verdict"].endswith("distinguishable from zero, tuned is better.")
    assert "not distinguishable from zero" in rows["ROUGE-L F1"]["verdict"]
    assert rows["GSM8K exact match"]["verdict"].endswith("the two models score alike on every example.")
    assert rows["IFEval instruction-level"]["difference"] == pytest.approx(3 / 3 - 2 / 3)


def test_multiple_choice_picks_the_choice_the_model_finds_likeliest(tmp_path, tiny_dir):
    """The 'choice' task (tasks.py) on tests/assets/lm_eval/qa.jsonl: each side picks the choice whose
    tokens (and EOS) have the lowest summed NLL after the question, here computed pair by pair."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qlora_helpers.evaluate import compare_paired, evaluate_choice, summarize
    from qlora_helpers.models import load_tokenizer
    from qlora_helpers.opening import setup_run
    from qlora_helpers.paths import PROJECT_ROOT
    from qlora_helpers.prompts import encode_pairs, render_instruction
    from qlora_helpers.tasks import TASKS

    qa = PROJECT_ROOT / "tests" / "assets" / "lm_eval" / "qa.jsonl"
    run = setup_run("smoke", "choice", ["train.wandb=disabled", f"eval.choice_path={qa}", "eval.choice_samples=5"],
                    str(tmp_path))
    assert TASKS["choice"].enabled(run.cfg.eval) and not TASKS["choice"].enabled(load_config("smoke").eval)
    tok = load_tokenizer(run.cfg.model)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    result = evaluate_choice(run, model, tok)
    rows = [json.loads(line) for line in qa.read_text().splitlines()][:5]

    def likeliest(row) -> int:
        nll = []
        for e in encode_pairs(run, tok, [(render_instruction(run, tok, row["question"]), c) for c in row["choices"]]):
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1].log_softmax(-1)
            nll.append(-sum(logp[i - 1, e["input_ids"][i]].item() for i in range(e["prompt_len"], len(e["input_ids"]))))
        return min(range(len(nll)), key=nll.__getitem__)

    with model.disable_adapter():
        assert result["base"]["chosen"] == [likeliest(r) for r in rows]
    assert result["tuned"]["chosen"] == [likeliest(r) for r in rows]
    assert result["tuned"]["per_example"] == [c == r["gold"] for c, r in zip(result["tuned"]["chosen"], rows)]
    assert summarize({"choice": result}) == {"multiple-choice accuracy": {
        side: sum(result[side]["per_example"]) / 5 for side in ("base", "tuned")}}
    assert [d["metric"] for d in compare_paired({"choice": result})] == ["multiple-choice accuracy"]
