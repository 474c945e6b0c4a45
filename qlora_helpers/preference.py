"""Stage 04b: preference tuning (DPO) of the SFT adapter on the same frozen 4-bit base.

DPO (Rafailov et al. 2023) trains on pairs (prompt, chosen, rejected) with one line of loss,

    -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))))

where pi is the model being tuned and ref the model it started from. We use TRL's `DPOTrainer`
(pinned in requirements.txt) rather than writing the loss: it brings the tokenization of pairs,
the chosen/rejected batching, the reward metrics and every Trainer feature stage 04 relies on.

The reference, and why no second model: the policy is the run's SFT adapter loaded trainable on the
4-bit base (`PeftModel.from_pretrained(..., is_trainable=True)`). Given such a PeftModel and no
`ref_model`, TRL copies the adapter into a second, frozen adapter named "ref" and computes the
reference log-probabilities by switching to it (peft's multiple adapters) for a no-grad forward.
So the reference is exactly "the model with the SFT adapter as it was before this stage", it
costs one more adapter (~1 MB for SmolLM2 at r=16, ~16 MB for 7B q/v) and no second copy of the
base. We chose it over `precompute_ref_log_probs`: that would save the no-grad forward only when
pairs are seen more than once (we train about one epoch), and it writes a cache file keyed by a
hash of the model into the datasets cache. Disabling the adapter instead (TRL's rule for a fresh
adapter) would make the *base* the reference, which is not what DPO after SFT means.

Two departures from TRL's defaults, both to match stage 04: TRL casts trainable adapter weights
of a quantized model to bf16 (the QLoRA paper's recommendation); we keep them in float32 as stage
04 trained them (on a CPU, bf16 matmuls are ~10x slower and our compute dtype is float32; on CUDA
mixed precision still computes in bf16). And the guards: the first optimizer step must have a
non-zero gradient (AVX512-BF16 CPUs can lose it in bitsandbytes' CPU kernel: models.py's note).

The supervised term (`preference.sft_weight`, TRL's "sft" loss beside "sigmoid", as RPO (Pang et al.
2024) adds it): plain DPO lowers the log-probability of both answers and only the rejected one faster.
On the default profile's own-data pairs that cost the answers their end (clean stops 0.72 -> 0.53 at lr
2e-4, -> 0.00 at 1e-3); adding the chosen answers' NLL kept them (0.81 at 5e-4): the README has the table.

Preference accuracy (the evaluation): the share of held-out pairs where the model gives the chosen
answer a higher summed log-probability than the rejected one, for base, SFT and SFT+DPO alike (no
reference needed), with paired bootstrap intervals for the differences. 05 calls
`evaluate_three_way` (preference accuracy and the answer metrics of all three) and `answers_three_way`
(answers side by side) for the base vs SFT vs SFT+DPO tables.

Imports: torch, transformers, peft, trl and datasets are imported inside the functions that use them.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from typing import Any

from .answers import builtin_source_names, compare, per_example
from .decoding import Answer, dense_base, generate_answers
from .errors import QLoraError
from .models import keep_4bit_on_autograd_path, load_model, load_tokenizer
from .paths import atomic_dir, read_json, write_json_atomic
from .preference_data import prepare_pairs
from .prepared import PreparedData, load_prepared
from .prompts import encode_pairs, encode_text
from .scoring import collate, paired_bootstrap
from .trainer import (
    NOT_LEARNING_CHECKS,
    MarkComplete,
    NonFiniteLoss,
    NotLearning,
    local_device,
    peak_memory,
    resolve_checkpoint,
    train_or_checkpoint,
)

SFT, POLICY, REFERENCE = "sft", "default", "ref"  # adapter names: 05's comparison, TRL's policy and reference
THREE = ("base", "sft", "sft+dpo")


# --- models ---------------------------------------------------------------------------------------


def load_policy_model(run):
    """(model, tokenizer): the 4-bit base prepared for k-bit training as in stage 04, with the run's SFT
    adapter loaded trainable (adapter name "default", which DPOTrainer trains)."""
    from peft import PeftModel, prepare_model_for_kbit_training

    cfg = run.cfg
    sft = run.require_adapter(final=False)
    tokenizer = load_tokenizer(cfg.model)
    base = load_model(cfg.model, cfg.quant, run.compute_dtype, local_device(run.device))
    if cfg.quant.load_in_4bit:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=cfg.train.gradient_checkpointing,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    model = PeftModel.from_pretrained(base, str(sft), is_trainable=True)
    return model, tokenizer


def keep_adapters_float32(model) -> int:
    """Undo TRL's bf16 cast of trainable adapter weights on quantized models (see the module doc)."""
    import torch

    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast


# --- scoring pairs --------------------------------------------------------------------------------


def answer_logps(model, tokenizer, prompts: list[str], answers: list[str], template: str,
                 batch_size: int) -> tuple[list[float], list[int]]:
    """(summed log-probability, token count) of each answer (+ EOS) after its prompt, tokenized as stage
    03 does. Rows are batched by length (less padding) and, on a CPU, run on de-quantized weights
    (decoding.dense_base: the same weights, without de-quantizing at every forward)."""
    import torch

    rows = encode_pairs(template, tokenizer, list(zip(prompts, answers)))
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]["input_ids"]), i))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums, counts = [0.0] * len(rows), [0] * len(rows)
    with torch.no_grad(), dense_base(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate([rows[i] for i in chunk], tokenizer.pad_token_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            scored = labels != -100
            for i, total, n in zip(chunk, (logp * scored).sum(-1).tolist(), scored.sum(-1).tolist()):
                sums[i], counts[i] = total, n
    model.train(was_training)
    return sums, counts


def pair_scores(model, tokenizer, pairs: list[dict[str, Any]], template: str, batch_size: int) -> dict[str, list]:
    """Per pair, log p(chosen) - log p(rejected) summed over the answer's tokens ('summed': the held-out
    preference accuracy's margin) and per token ('per_token': mean log-probability of chosen minus that of
    rejected, blind to length: a summed margin also rewards the shorter answer). > 0: prefers chosen."""
    prompts = [p["prompt"] for p in pairs]
    answers = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    sums, counts = answer_logps(model, tokenizer, prompts + prompts, answers, template, batch_size)
    n = len(pairs)
    return {"summed": [c - r for c, r in zip(sums[:n], sums[n:])],
            "per_token": [c / max(a, 1) - r / max(b, 1) for c, r, a, b in zip(sums[:n], sums[n:], counts[:n],
                                                                               counts[n:])]}


def pair_margins(model, tokenizer, pairs: list[dict[str, Any]], template: str, batch_size: int) -> list[float]:
    """log p(chosen) - log p(rejected) per pair (summed over tokens): > 0 means the model prefers chosen."""
    return pair_scores(model, tokenizer, pairs, template, batch_size)["summed"]


def preference_accuracy(margins: list[float]) -> float:
    return sum(m > 0 for m in margins) / len(margins)


def compare_accuracy(before: list[float], after: list[float], seed: int = 0) -> dict[str, Any]:
    """Accuracy before and after on the same pairs, and the difference with a paired bootstrap interval."""
    hits = lambda margins: [float(m > 0) for m in margins]  # noqa: E731
    return {"before": preference_accuracy(before), "after": preference_accuracy(after),
            "difference": paired_bootstrap(hits(before), hits(after), seed=seed)}


# --- training -------------------------------------------------------------------------------------


class _Clock:
    """Wall and CPU seconds per phase: on a shared machine CPU time (all threads) is the steadier one."""

    def __init__(self):
        self.seconds: dict[str, dict[str, float]] = {}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, phase: str) -> dict[str, dict[str, float]]:
        wall, cpu = time.perf_counter(), time.process_time()
        self.seconds[phase] = {"wall": round(wall - self._wall, 1), "cpu": round(cpu - self._cpu, 1)}
        self._wall, self._cpu = wall, cpu
        return {phase: self.seconds[phase]}


def dpo_settings(run) -> dict[str, Any]:
    """Keyword arguments of TRL's DPOConfig for this run: preference.* plus the runtime stage 01 chose."""
    p, runtime = run.cfg.preference, run.runtime
    return dict(
        output_dir=str(run.preference_checkpoints_dir),
        beta=p.beta, learning_rate=p.learning_rate, lr_scheduler_type=p.lr_scheduler,
        max_steps=p.max_steps, per_device_train_batch_size=p.micro_batch_size,
        gradient_accumulation_steps=p.gradient_accumulation_steps, max_length=p.max_length,
        # DPO's sigmoid loss, plus with sft_weight > 0 the chosen answers' NLL (RPO): see `preference.sft_weight`
        loss_type=["sigmoid", "sft"] if p.sft_weight > 0 else ["sigmoid"],
        loss_weights=[1.0, p.sft_weight] if p.sft_weight > 0 else None,
        precompute_ref_log_probs=False,  # the frozen "ref" adapter instead: see the module doc
        # transformers 5's names (gradient_checkpointing* are deprecated aliases; TRL reads them, mirrored)
        activation_checkpointing=run.cfg.train.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        optim=runtime.optimizer, bf16=runtime.compute_dtype == "bfloat16", fp16=runtime.compute_dtype == "float16",
        use_cpu=runtime.device == "cpu", max_grad_norm=run.cfg.train.max_grad_norm,
        logging_steps=p.logging_steps, logging_nan_inf_filter=False, report_to=[],
        save_strategy="steps", save_steps=p.save_steps, save_total_limit=run.cfg.train.save_total_limit,
        save_only_model=False,  # optimizer, scheduler and RNG state too: a resumed run continues the same run
        seed=p.seed, data_seed=p.seed, dataloader_num_workers=0, disable_tqdm=False,
    )


def pairs_dataset(pairs: list[dict[str, Any]]):
    """The pairs as the `datasets.Dataset` DPOTrainer takes: prompt, chosen, rejected (strings)."""
    import datasets

    return datasets.Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])


def guard_callbacks() -> list:
    """Stop at a non-finite loss, or at a zero gradient norm (nothing would learn); mark each checkpoint
    complete once written (stage 04's marker: only complete checkpoints are resumed from)."""
    from transformers import TrainerCallback

    class PreferenceGuard(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs and not math.isfinite(logs["loss"]):
                raise NonFiniteLoss(f"The DPO loss became {logs['loss']} at step {state.global_step}. Lower "
                                    f"preference.learning_rate or raise preference.beta.")
            if logs.get("grad_norm") == 0.0:
                raise NotLearning(f"The adapters got a zero gradient at DPO step {state.global_step}: training "
                                  f"would run but learn nothing. {NOT_LEARNING_CHECKS}")

    return [PreferenceGuard(), MarkComplete()]


def build_dpo_trainer(run, model, tokenizer, train_pairs: list[dict[str, Any]]):
    """DPOTrainer over the pairs with the frozen reference adapter (the notebook shows these lines)."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**dpo_settings(run))
    return DPOTrainer(model=model, ref_model=None, args=args, train_dataset=pairs_dataset(train_pairs),
                      processing_class=tokenizer, callbacks=guard_callbacks())


def check_reference(trainer) -> dict[str, Any]:
    """The policy trains, the reference adapter is a frozen copy of it; adapters kept in float32."""
    model = trainer.model
    if REFERENCE not in model.peft_config:
        raise QLoraError("DPOTrainer did not create its frozen reference adapter 'ref': the reference would be "
                         "the base model, not the SFT model. Check the trl and peft versions in requirements.txt.")
    cast = keep_adapters_float32(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable or any(f".{REFERENCE}." in n for n in trainable):
        raise QLoraError(f"Wrong trainable weights for DPO ({len(trainable)}; the reference adapter must be frozen).")
    return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad), "recast_to_float32": cast}


def resolve_preference_resume(run) -> str | None:
    """The checkpoint preference.resume names; with 'auto' only one completed after the SFT adapter was
    saved (an older one tuned another SFT adapter)."""
    sft = (run.adapter_dir / "adapter_config.json").stat().st_mtime_ns if run.has_adapter else 0
    return resolve_checkpoint(run.cfg.preference.resume, run.preference_checkpoints_dir, "preference.resume", sft)


def train_dpo(trainer, resume: str | None = None) -> dict[str, Any]:
    """Run the trainer (from checkpoint `resume` if given); the log history (loss, rewards/chosen,
    rejected, margins, accuracies per step). Ctrl-C saves a complete checkpoint first, as in stage 04."""
    import torch

    keep_4bit_on_autograd_path(trainer.model)  # whatever ran before, the 4-bit layers must pass gradients
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train_or_checkpoint(trainer, resume, "Preference tuning",
                                 "Run 04b again (preference.resume=auto) to continue.", "preference.resume")
    seconds = time.perf_counter() - start
    return {"steps": trainer.state.global_step, "train_seconds": seconds, "train_loss": result.training_loss,
            "resumed_from": resume, "log_history": list(trainer.state.log_history), **peak_memory()}


def save_preference_adapter(run, model, tokenizer, summary: dict[str, Any]) -> None:
    """The tuned policy adapter alone (not the reference copy), atomically, beside the SFT adapter."""
    with atomic_dir(run.preference_adapter_dir) as tmp:
        model.save_pretrained(tmp, selected_adapters=[POLICY], safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "qlora_config.json", run.cfg.to_dict())
        (tmp / "README.md").write_text(
            f"# Preference-tuned adapter: {run.name}\n\nThe run's SFT adapter after {summary['steps']} DPO steps "
            f"(beta {run.cfg.preference.beta}, lr {run.cfg.preference.learning_rate}, sft_weight "
            f"{run.cfg.preference.sft_weight}) on "
            f"{summary['pairs']['train']} pairs ({summary['pairs']['origin']}). Held-out preference accuracy "
            f"{summary['accuracy']['before']:.3f} -> {summary['accuracy']['after']:.3f}.\n", encoding="utf-8")


def training_rows(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per logged step: loss, chosen and rejected rewards, their margin and reward accuracy."""
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "grad_norm")
    return [{"step": h["step"], **{k: h[k] for k in keys if k in h}} for h in log_history if "rewards/margins" in h]


def run_preference(run, trainer, tokenizer, pairs: dict[str, Any]) -> dict[str, Any]:
    """Score the held-out pairs before, train, score after, save the adapter, write the report (last)."""
    cfg = run.cfg
    batch = cfg.eval.batch_size
    clock = _Clock()
    before = pair_scores(trainer.model, tokenizer, pairs["eval"], cfg.data.template, batch)
    clock.lap("score_before")
    trained = train_dpo(trainer, resolve_preference_resume(run))
    clock.lap("train")
    after = pair_scores(trainer.model, tokenizer, pairs["eval"], cfg.data.template, batch)
    clock.lap("score_after")
    rows = training_rows(trained.pop("log_history"))
    summary = {
        "method": cfg.preference.method, "beta": cfg.preference.beta, "sft_weight": cfg.preference.sft_weight,
        "reference": "frozen copy of the SFT adapter "
        "(TRL's 'ref' adapter on the same 4-bit base)", "sft_adapter": str(run.adapter_dir), **trained,
        "pairs": {"train": len(pairs["train"]), "eval": len(pairs["eval"]), "origin": pairs["report"]["origin"]},
        "accuracy": compare_accuracy(before["summed"], after["summed"], seed=cfg.preference.seed),
        "accuracy_per_token": compare_accuracy(before["per_token"], after["per_token"], seed=cfg.preference.seed),
        "margins": {"before": before["summed"], "after": after["summed"]},
        "margins_per_token": {"before": before["per_token"], "after": after["per_token"]}, "training": rows,
        "final_logged": rows[-1] if rows else None, "device": run.device, "compute_dtype": run.runtime.compute_dtype,
        "seconds": {**pairs["report"].get("seconds", {}), **clock.seconds},
    }
    save_preference_adapter(run, trainer.model, tokenizer, summary)
    write_json_atomic(run.preference_report, {**summary, "pair_report": pairs["report"]})
    return summary


def prepare_run_pairs(run, model, tokenizer, prepared: PreparedData | None = None) -> dict[str, Any]:
    """The run's pairs (hub/offline sources or its own data), written to `preference_pairs.json`; when
    training will resume from a checkpoint, the pairs it was trained on (that file) are read back."""
    cfg = run.cfg
    if resolve_preference_resume(run) and run.preference_pairs.is_file():
        print(f"Resuming: the pairs of {run.preference_pairs.name}, as the checkpoint was trained on them.")
        return read_json(run.preference_pairs)
    prepared = prepared or load_prepared(run, tokenizer)
    clock = _Clock()
    pairs = prepare_pairs(model, tokenizer, cfg.preference, cfg.data, prepared, cfg.eval.answer_batch_size)
    pairs["report"]["seconds"] = clock.lap("pairs")
    write_json_atomic(run.preference_pairs, pairs)
    return pairs


def run_stage(run) -> dict[str, Any]:
    """Stage 04b's entry point (CLI, the notebook's steps): pairs, DPO from the SFT adapter, the tuned
    adapter in `adapter_preference/` and `preference.json` (written last)."""
    if not run.cfg.preference.enabled:
        raise QLoraError("Stage 04b runs only with preference.enabled=true (e.g. --set preference.enabled=true).")
    model, tokenizer = load_policy_model(run)
    pairs = prepare_run_pairs(run, model, tokenizer)
    trainer = build_dpo_trainer(run, model, tokenizer, pairs["train"])
    check_reference(trainer)
    summary = run_preference(run, trainer, tokenizer, pairs)
    return {k: v for k, v in summary.items() if not k.startswith("margins")}


# --- base vs SFT vs SFT+DPO (for stage 05) ----------------------------------------------------------


def load_three_way_model(run):
    """(model, tokenizer): the 4-bit base with the SFT adapter ("sft") and the preference adapter
    ("default"); the base is either adapter disabled. One base in memory for all three."""
    from peft import PeftModel

    if not run.has_preference_adapter:
        run.require("preference_adapter_dir")
    tokenizer = load_tokenizer(run.cfg.model)
    base = load_model(run.cfg.model, run.cfg.quant, run.compute_dtype, run.device)
    model = PeftModel.from_pretrained(base, str(run.preference_adapter_dir), adapter_name=POLICY)
    model.load_adapter(str(run.require_adapter(final=False)), adapter_name=SFT)
    model.eval()
    return model, tokenizer


def for_three(model, fn, labels: tuple[str, ...] = THREE) -> dict[str, Any]:
    """{'base': fn() with adapters off, 'sft': with the SFT adapter, 'sft+dpo': with the tuned one}
    (only the `labels` asked for)."""
    out = {}
    if "base" in labels:
        with model.disable_adapter():
            out["base"] = fn()
    for label, adapter in (("sft", SFT), ("sft+dpo", POLICY)):
        if label in labels:
            model.set_adapter(adapter)
            out[label] = fn()
    model.set_adapter(POLICY)
    return out


def compare_three_way(run, model, tokenizer, pairs: list[dict[str, Any]] | None = None,
                      known: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """Held-out preference accuracy of base, SFT and SFT+DPO on the same pairs (default: the held-out
    pairs 04b saved), and each step's difference with a paired bootstrap interval. `known` margins
    ({'sft': ..., 'sft+dpo': ...}) are reused, not scored again; on 04b's own held-out pairs they default
    to the before and after margins 04b scored with the same two adapters (preference.json), so only the
    base is scored here."""
    cfg = run.cfg
    if pairs is None:
        pairs = read_json(run.require("preference_pairs"))["eval"]
        if known is None and run.preference_report.is_file():
            scored = read_json(run.preference_report)["margins"]
            known = {"sft": scored["before"], "sft+dpo": scored["after"]}
    known = known or {}
    score = lambda: pair_margins(model, tokenizer, pairs, cfg.data.template, cfg.eval.batch_size)  # noqa: E731
    found = for_three(model, score, tuple(label for label in THREE if label not in known))
    margins = {label: known[label] if label in known else found[label] for label in THREE}
    seed = cfg.preference.seed
    steps = {f"{a} -> {b}": compare_accuracy(margins[a], margins[b], seed)["difference"]
             for a, b in (("base", "sft"), ("sft", "sft+dpo"), ("base", "sft+dpo"))}
    return {"pairs": len(pairs), "accuracy": {k: preference_accuracy(m) for k, m in margins.items()},
            "differences": steps, "margins": margins}


def answers_three_way(run, model, tokenizer, pairs: list[dict[str, Any]], n: int,
                      seed: int = 0) -> list[dict[str, Any]]:
    """Greedy answers of base, SFT and SFT+DPO side by side (and the chosen answer) for n held-out
    prompts drawn by `seed`."""
    picked = sorted(random.Random(seed).sample(range(len(pairs)), min(n, len(pairs))))
    prompts = [pairs[i]["prompt"] for i in picked]
    model.eval()
    ids = [encode_text(run, tokenizer, p) for p in prompts]
    tokens, batch = run.cfg.eval.answer_tokens, run.cfg.eval.answer_batch_size
    answers = for_three(model, lambda: generate_answers(model, tokenizer, ids, tokens, batch))
    return [{"prompt": prompts[j], "chosen": pairs[i]["chosen"], **{k: answers[k][j].text for k in THREE}}
            for j, i in enumerate(picked)]


STEPS = (("sft", "sft+dpo"), ("base", "sft"), ("base", "sft+dpo"))  # the paired comparisons of 05's three-way table


def reusable_answers(known: dict[str, Any] | None, prompts: list[str], max_new_tokens: int,
                     batch_size: int) -> dict[str, list[Answer]]:
    """From a `answers.run_answers` result on this three-way model (05's answer task: the adapters off,
    then the active SFT+DPO adapter), the base and SFT+DPO answers as `Answer`s, when it answered the same
    prompts with the same budget and batch size (greedy: the same answers again); {} otherwise."""
    settings = (known or {}).get("settings", {})
    if (not known or known.get("prompts") != prompts or settings.get("max_new_tokens") != max_new_tokens
            or settings.get("batch_size") != batch_size):
        return {}
    return {label: [Answer(text, tokens, stopped) for text, tokens, stopped in
                    zip(known[side]["outputs"], known[side]["tokens"], known[side]["stopped"])]
            for label, side in (("base", "base"), ("sft+dpo", "tuned"))}


def answer_metrics_three_way(run, model, tokenizer, data: PreparedData | None = None,
                             known: dict[str, Any] | None = None) -> dict[str, Any]:
    """The answer metrics of answers.py (clean stops, repetition, length, ROUGE-L, exact match on the
    built-in data) for base, SFT and SFT+DPO on the same eval.answer_samples held-out examples (03's
    eval split), generated once per model as 05's answer task does; each step of STEPS with its
    paired bootstrap interval (`answers.compare`: its 'base' is the step's first, 'tuned' its second).
    `known`: 05's answer task result on this model; its base and SFT+DPO answers are reused when they
    answered the same examples the same way (`reusable_answers`), so only the SFT answers are generated."""
    cfg = run.cfg.eval
    data = data if data is not None else load_prepared(run, tokenizer)
    examples = data.eval[:cfg.answer_samples]
    if not examples:
        raise QLoraError("No held-out examples for the answer metrics: raise data.eval_size or eval.answer_samples.")
    builtin = builtin_source_names(data.report)
    refs, checked = [e["response"] for e in examples], [e["source"] in builtin for e in examples]
    ids = [encode_text(run, tokenizer, e["prompt"]) for e in examples]
    model.eval()
    answers = reusable_answers(known, [e["prompt"] for e in examples], cfg.answer_tokens, cfg.answer_batch_size)
    answers.update(for_three(model, lambda: generate_answers(model, tokenizer, ids, cfg.answer_tokens,
                                                             cfg.answer_batch_size),
                             tuple(label for label in THREE if label not in answers)))
    values = {label: per_example(answers[label], refs, checked) for label in THREE}
    return {"examples": len(examples), "prompts": [e["prompt"] for e in examples], "references": refs,
            "means": {label: {m: statistics.fmean(v) for m, v in values[label].items()} for label in THREE},
            "outputs": {label: [a.text for a in answers[label]] for label in THREE}, "per_example": values,
            "differences": [{"step": f"{a} -> {b}", **row} for a, b in STEPS
                            for row in compare(values[a], values[b], seed=run.cfg.data.seed)]}


def evaluate_three_way(run, model, tokenizer, data: PreparedData | None = None,
                       answers: dict[str, Any] | None = None) -> dict[str, Any]:
    """05's comparison of base, SFT and SFT+DPO (a model from `load_three_way_model`): held-out
    preference accuracy on the pairs 04b held out, and the answer metrics, each step of STEPS with its
    paired bootstrap interval. `answers`: 05's answer task result on this model, reused where it can be
    (`answer_metrics_three_way`)."""
    accuracy = compare_three_way(run, model, tokenizer)
    margins = accuracy["margins"]
    compared = {(a, b): compare_accuracy(margins[a], margins[b], run.cfg.preference.seed) for a, b in STEPS}
    steps = [{"step": f"{a} -> {b}", "before": r["before"], "after": r["after"], **r["difference"]}
             for (a, b), r in compared.items()]
    return {"preference": {"pairs": accuracy["pairs"], "accuracy": accuracy["accuracy"], "differences": steps,
                           "margins": margins},
            "answers": answer_metrics_three_way(run, model, tokenizer, data, answers)}
