import pytest
import torch

from qlora_helpers.answers import (
    METRICS,
    compare,
    detectable_difference,
    length_gap,
    repetition,
    score_answers,
    showcase,
)
from qlora_helpers.config import load_config
from qlora_helpers.decoding import Answer, dense_base, generate_answers
from qlora_helpers.generation import generate

# --- the metrics on real small inputs ---------------------------------------------------------------


def test_repetition_counts_repeated_word_trigrams():
    assert repetition("a b c a b c") == pytest.approx(1 / 4)  # abc bca cab abc: the last repeats
    assert repetition("John Marshall was born. " * 6) == pytest.approx(18 / 22)  # 22 trigrams, 4 distinct
    assert repetition("The capital of France is Paris.") == 0.0
    assert repetition("Yes, yes") == 0.0  # fewer than three words: nothing to repeat
    assert repetition("") == 0.0
    assert repetition("Paris, paris PARIS paris") == pytest.approx(1 / 2)  # case and punctuation do not count


def test_length_gap_is_symmetric_in_doublings():
    assert length_gap("one two three", "uno dos tres") == 0.0
    assert length_gap("a b c d e f g", "x y z") == pytest.approx(1.0)  # 8 vs 4 (words + 1)
    assert length_gap("x y z", "a b c d e f g") == pytest.approx(1.0)
    assert length_gap("", "a") == pytest.approx(1.0)


def test_detectable_difference():
    assert detectable_difference(64) == pytest.approx((1.959964 + 0.841621) / 8, rel=1e-5)  # 0.350
    assert detectable_difference(64, sd=0.5) == pytest.approx(0.1751, abs=1e-4)
    assert detectable_difference(256) == pytest.approx(detectable_difference(64) / 2)
    with pytest.raises(ValueError, match="n >= 1"):
        detectable_difference(0)


def _answers(texts, stopped):
    return [Answer(t, len(t.split()), s) for t, s in zip(texts, stopped)]


REFS = ["3 + 4 = 7.\nAnswer: 7", "2, 5, 9", "Paris is the capital of France."]


def test_score_answers_pairs_every_metric():
    base = _answers(["3 and 4 make 7 and 7 and 7 and 7 and 7 and 7", "9, 5, 2", "Paris is the capital of France."],
                    [False, False, True])
    tuned = _answers(["3 + 4 = 7.\nAnswer: 7", "2, 5, 9", "Paris is the capital of France."], [True, True, True])
    result = score_answers(base, tuned, REFS, checked=[True, True, False])
    assert result["base"]["clean stop"] == pytest.approx(1 / 3) and result["tuned"]["clean stop"] == 1.0
    assert result["base"]["exact match"] == 0.0 and result["tuned"]["exact match"] == 1.0
    assert result["base"]["per_example"]["exact match"] == [0.0, 0.0]  # only the checked examples
    assert result["tuned"]["repetition"] == 0.0 and result["base"]["per_example"]["repetition"] == [7 / 13, 0, 0]
    assert result["tuned"]["ROUGE-L F1"] == pytest.approx(1.0)
    assert result["base"]["stopped"] == [False, False, True] and result["tuned"]["outputs"][1] == "2, 5, 9"
    rows = {r["metric"]: r for r in result["differences"]}
    assert list(rows) == list(METRICS)
    assert rows["clean stop"]["difference"] == pytest.approx(2 / 3) and rows["clean stop"]["n"] == 3
    assert rows["exact match"]["n"] == 2 and rows["exact match"]["difference"] == 1.0
    assert rows["length gap"]["lower_is_better"] and rows["length gap"]["difference"] < 0
    assert rows["clean stop"]["detectable_worst_case"] == pytest.approx(detectable_difference(3))
    assert "tuned - base = +0.6667" in rows["clean stop"]["verdict"]


def test_identical_answers_have_no_difference_and_no_detectable_spread():
    same = _answers(["Paris.", "2, 5, 9", "7"], [True, True, False])
    rows = compare(*(score_answers(same, same, REFS)[side]["per_example"] for side in ("base", "tuned")))
    assert [r["metric"] for r in rows] == ["clean stop", "repetition", "length gap", "ROUGE-L F1"]
    assert all(r["difference"] == 0 and r["detectable"] is None for r in rows)
    assert "no difference" in rows[0]["verdict"]


def test_the_verdict_and_the_tables_give_one_minimum_detectable_difference():
    """A difference not told from zero: the verdict names the same 80%-power number as the answer
    table's and eval.json's `detectable` column (it used to give the interval's half width, ~1.4x smaller)."""
    from qlora_helpers.evaluate import compare_paired
    from qlora_helpers.scoring import detectable_from_interval, paired_bootstrap

    base = [0.1 * (i % 7) for i in range(64)]
    tuned = [b + 0.05 * ((i * 5) % 9 - 4) for i, b in enumerate(base)]  # differences: -0.2 ... +0.2, mean ~0
    rows = {r["metric"]: r for r in compare({"ROUGE-L F1": base}, {"ROUGE-L F1": tuned})}
    row = rows["ROUGE-L F1"]
    assert not row["distinguishable"]
    assert row["verdict"].endswith(f"is about ±{row['detectable']:.3g}.") and "80% of the time" in row["verdict"]
    assert f"±{(row['high'] - row['low']) / 2:.3g}" not in row["verdict"]
    side = lambda values: {"per_example": {"ROUGE-L F1": values}}  # noqa: E731
    (paired,) = compare_paired({"answers": {"base": side(base), "tuned": side(tuned)}})
    assert paired["detectable"] == row["detectable"] and paired["verdict"] == row["verdict"]  # eval.json's too
    # for a weighted or transformed metric the same quantity comes from the interval: near the normal formula
    r = paired_bootstrap(base, tuned, resamples=4000)
    assert detectable_from_interval(r) == pytest.approx(row["detectable"], rel=0.1)


def test_score_answers_needs_one_answer_per_reference():
    with pytest.raises(ValueError, match="2 base and 3 tuned answers for 3 references"):
        score_answers(_answers(["a", "b"], [1, 1]), _answers(["a", "b", "c"], [1, 1, 1]), REFS)


def test_showcase_draws_by_seed_not_by_score():
    result = {"prompts": [f"p{i}" for i in range(10)], "references": [f"r{i}" for i in range(10)],
              "base": {"outputs": [f"b{i}" for i in range(10)]}, "tuned": {"outputs": [f"t{i}" for i in range(10)]}}
    picked = showcase(result, 3, seed=42)
    assert picked == showcase(result, 3, seed=42) and picked != showcase(result, 3, seed=1)
    assert [p["prompt"][1:] for p in picked] == [p["base"][1:] for p in picked] == [p["tuned"][1:] for p in picked]
    assert len(showcase(result, 20, seed=0)) == 10


# --- generation: the same greedy answers, faster ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lora(tiny_dir):
    """The tiny random LLaMA in 4 bit (CPU, fp32 compute) with a random, non-zero LoRA on q/v."""
    from qlora_helpers.models import load_model, load_tokenizer
    from qlora_helpers.train import add_lora

    cfg = load_config("smoke")
    model = add_lora(load_model(cfg.model, cfg.quant, torch.float32, "cpu"), cfg.lora, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.eval(), load_tokenizer(cfg.model)


PROMPTS = ["Sort these numbers: 5, 2, 9", "Hi", "Convert 3 kilometres to metres, and say how you did it.",
           "Name a colour.", "What is 2 + 2?"]


def test_dense_base_computes_the_same_logits_and_restores_the_4bit_layers(tiny_lora):
    import bitsandbytes as bnb

    model, tok = tiny_lora
    ids = tok(PROMPTS[2], return_tensors="pt")
    four_bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    with torch.no_grad():
        reference = model(**ids).logits
        with dense_base(model) as swapped:
            assert swapped == four_bit > 0
            assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
            dense = model(**ids).logits
            with model.disable_adapter():
                dense_base_only = model(**ids).logits
        with model.disable_adapter():
            base_only = model(**ids).logits
    assert torch.allclose(dense, reference, rtol=0, atol=1e-5 * reference.abs().max())
    assert torch.allclose(dense_base_only, base_only, rtol=0, atol=1e-5 * base_only.abs().max())
    assert not torch.allclose(reference, base_only)  # the adapter still acts inside the block
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == four_bit


def test_generate_answers_matches_model_generate(tiny_lora):
    model, tok = tiny_lora
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    today = generate(model, tok, ids, 12, batch_size=2)
    for dense in (False, True):
        answers = generate_answers(model, tok, ids, 12, batch_size=2, dense=dense)
        assert [a.text for a in answers] == today
        assert all(a.tokens == 12 and not a.stopped for a in answers)  # random weights never pick EOS here


def test_a_row_that_ends_leaves_and_is_reported_stopped(tiny_lora):
    model, tok = tiny_lora
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    free = generate_answers(model, tok, ids, 6, batch_size=8)
    greedy = []
    for prompt in PROMPTS:
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        greedy.append(out[0, enc["input_ids"].shape[1]:].tolist())
    # the first prompt whose answer has a token at step k >= 1 not seen before it: that token becomes EOS
    row, k = next((i, k) for i, ids in enumerate(greedy) for k in range(1, 6) if ids[k] not in ids[:k])
    old_eos = tok.eos_token
    tok.eos_token = tok.convert_ids_to_tokens(greedy[row][k])
    try:
        answers = generate_answers(model, tok, ids, 6, batch_size=8)
    finally:
        tok.eos_token = old_eos
    assert answers[row].stopped and answers[row].tokens == k
    assert answers[row].text == tok.decode(greedy[row][:k], skip_special_tokens=True)
    for i, answer in enumerate(answers):  # the other rows go on as before, unless they also met that token
        if i != row and not answer.stopped:
            assert answer.text == free[i].text and answer.tokens == 6


def test_run_answers_scores_both_sides_and_adds_exact_match_on_builtin_data(tmp_path, tiny_lora):
    from qlora_helpers.answers import run_answers
    from qlora_helpers.data import prepare_run_data
    from qlora_helpers.opening import setup_run

    model, tok = tiny_lora
    run = setup_run("smoke", "answers", ["train.wandb=disabled", "data.sources=[{path: builtin}]",
                                         "data.eval_size=16"], str(tmp_path))
    data = prepare_run_data(run)
    result = run_answers(run, model, tok, n=6, batch_size=4, max_new_tokens=5, data=data)
    assert result["settings"]["examples"] == 6 and result["sources"] == ["builtin"] * 6
    assert result["prompts"] == [e["prompt"] for e in data.eval[:6]]
    rows = {r["metric"]: r for r in result["differences"]}
    assert list(rows) == ["clean stop", "repetition", "length gap", "ROUGE-L F1", "exact match"]
    assert all(r["n"] == 6 for r in rows.values())
    assert result["base"]["outputs"] != result["tuned"]["outputs"]  # the adapter is on for tuned only
    assert all(t <= 5 for side in ("base", "tuned") for t in result[side]["tokens"])
    assert result["tuned"]["exact match"] == 0.0  # random weights answer nothing right
