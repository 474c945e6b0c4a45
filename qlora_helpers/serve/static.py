"""Static-cache decoding: fixed slots of a preallocated KV cache and a compiled decode step (CUDA).

The dynamic path (`engine.Batch`) re-pads and concatenates a `DynamicCache` as rows come and go, so
every step has new shapes and runs eagerly: on a 7B model a step costs ~33 ms of Python and kernel
launches for ~5 ms of GPU work. Here the shapes never change, so the step is compiled once per
batch bucket and replayed as a CUDA graph (`torch.compile(mode="reduce-overhead")`).

Design (how rows of different lengths share one static cache):

- **Slots.** One `[slots, kv_heads, max_len, head_dim]` key and value tensor per layer, allocated
  once, addresses marked static. A row owns one slot while it generates; the active rows always
  occupy slots `0..n-1` (when a row leaves, the last row's slot is copied into its place), so a step
  over `n` rows works on the first `b` slots, `b` = the smallest bucket >= n (1, 2, 4, 8, ...).
  The padding rows `n..b-1` compute garbage into free slots, which a joining row overwrites.
- **Per-row write columns.** transformers' `StaticCache` writes every row at one shared
  `cache_position`; our rows have different lengths. `SlotLayer.update` instead writes each row's
  new key/value at its own column (`keys[rows, :, columns] = ...`, one scatter per layer), and a
  per-slot boolean `valid [slots, max_len]` says which columns hold that row's real tokens; the step
  turns it into the 4-D additive mask that transformers passes to attention as is. RoPE positions
  are per row too (`positions`), separate from the write column: a row prefilled left-padded keeps
  its padding columns (invalid, never attended) and counts positions from its first real token.
- **Joining.** Rows that join at a step boundary are prefilled together in one eager forward
  (left-padded, a causal mask that hides the padding), writing columns `0..T-1` of their slots;
  their first token is chosen from that forward's last position. Prefill is not compiled (its
  shapes vary with the prompts), decode is.
- **The compiled step** reads the pending tokens, columns and positions from static buffers, writes
  one column per row, marks it valid, advances the row's column and position, and returns the
  logits `[b, vocab]` and their argmax, which it also writes into the token buffer as the next
  step's input. Choosing tokens (sampling, stop strings, logprobs) stays per row in Python
  (`batch.Rows._choose`), exactly as on the dynamic path, so both paths produce the same rows; a row
  whose choice is not the plain argmax has its token written over from the host.
- **Overlapped steps.** The argmax comes back through pinned memory behind an event, so the host
  waits for that step only. When every row is plain greedy, `StaticBatch.step` launches the next
  step before it decodes the current step's tokens into text (a row that ends there computed one
  token too many, which nobody reads; joining and leaving rows move slots in stream order after
  it); otherwise it launches it with the host's tokens before returning. So the host's work per
  step (text decoding, stop strings, the guard check and graph launch) runs while the GPU computes.
- **Restarts.** `warm_up(cache_root)` loads torch's compile artefacts saved by an earlier start with
  the same model, GPU, versions and buckets, and saves them after a cold compile (compile_cache.py).

The attention of a step reads `max_len` columns of each row (the server's context length), so a
long context costs bandwidth at every step even for short rows.

Without CUDA, or with `compile=False`, the same slots run eagerly: the CPU tests prove that this path
computes what the dynamic path computes, and the GPU tests that the compiled one does too.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..errors import QLoraError
from .batch import Job, Rows, advance, finish, with_cache
from .compile_cache import CompileCache, cache_key
from .sampling import SamplingParams

log = logging.getLogger("qlora_helpers.serve")

# The step's Inductor options: CUDA graphs (what mode="reduce-overhead" sets) and, per decoder,
# coordinate-descent tuning (gpt-fast's setting: with it Inductor turns a batch-1 matmul into a tuned
# reduction kernel that reads the weights at near copy bandwidth, where cuBLAS's GEMV does not).
STEP_OPTIONS = {"triton.cudagraphs": True}


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes the step is compiled for: powers of two below `max_batch`, and `max_batch` itself."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return tuple(sizes + [max_batch])


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values for every slot; writes each row at its own columns."""

    is_compileable = True
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, cache: SlotCache):
        super().__init__()
        self.keys, self.values, self.cache = keys, values, cache
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated up front
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        rows, columns = self.cache.rows, self.cache.columns  # [n, 1], [n, T]
        self.keys[rows, :, columns] = key_states.transpose(1, 2)
        self.values[rows, :, columns] = value_states.transpose(1, 2)
        if self.cache.attend is None:  # prefill: the prompt attends to itself only
            return key_states, value_states
        return self.keys[:self.cache.attend], self.values[:self.cache.attend]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class SlotCache(Cache):
    """The cache the model sees: `SlotLayer`s, plus where this forward writes (`rows`, `columns`) and
    how many slots it attends to (`attend`; None during prefill)."""

    def __init__(self, config, slots: int, max_len: int, dtype: torch.dtype, device: torch.device):
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        layers = []
        for _ in range(config.num_hidden_layers):
            keys = torch.zeros(slots, heads, max_len, head_dim, dtype=dtype, device=device)
            values = torch.zeros_like(keys)
            torch._dynamo.mark_static_address(keys)
            torch._dynamo.mark_static_address(values)
            layers.append(SlotLayer(keys, values, self))
        super().__init__(layers=layers)
        self.rows: torch.Tensor | None = None
        self.columns: torch.Tensor | None = None
        self.attend: int | None = None

    def move_slot(self, source: int, target: int) -> None:
        for layer in self.layers:
            layer.keys[target].copy_(layer.keys[source])
            layer.values[target].copy_(layer.values[source])


def _model_dims(model) -> tuple[object, torch.dtype, torch.device]:
    config = model.config
    config = getattr(config, "text_config", None) or config
    embed = model.get_input_embeddings().weight
    return config, embed.dtype, embed.device


class StaticDecoder:
    """The slots, their bookkeeping buffers and the decode step (compiled per bucket on CUDA).

    `slots`: the most rows at once (serve.max_concurrent); `max_len`: prompt + answer tokens per row
    (the server's context length); `buckets`: the batch sizes compiled (default `batch_buckets`);
    `tune`: Inductor's coordinate-descent tuning (batch-1 matmuls become its own tuned GEMV kernels)."""

    def __init__(self, model, slots: int, max_len: int, compile: bool | None = None,
                 buckets: tuple[int, ...] | None = None, tune: bool = True):
        self.model, self.slots, self.max_len = model, slots, max_len
        config, self.dtype, self.device = _model_dims(model)
        self.vocab = config.vocab_size
        self.cache = SlotCache(config, slots, max_len, self.dtype, self.device)
        self.cache_kwargs = with_cache(model, self.cache)
        self.buckets = tuple(sorted(buckets)) if buckets else batch_buckets(slots)
        if self.buckets[-1] < slots:
            raise QLoraError(f"batch buckets {self.buckets} must reach the slot count {slots}")
        long = dict(dtype=torch.long, device=self.device)
        self.tokens = torch.zeros(slots, 1, **long)  # each slot's pending token
        self.columns = torch.zeros(slots, 1, **long)  # the column its pending token is written to
        self.positions = torch.zeros(slots, 1, **long)  # that token's RoPE position
        self.valid = torch.zeros(slots, max_len, dtype=torch.bool, device=self.device)
        self.row_index = torch.arange(slots, **long)[:, None]
        for buffer in (self.tokens, self.columns, self.positions, self.valid, self.row_index):
            torch._dynamo.mark_static_address(buffer)
        self.compiled = (self.device.type == "cuda") if compile is None else compile
        self.options = dict(STEP_OPTIONS, coordinate_descent_tuning=tune)
        # dynamic=None (Dynamo's default): bucket 1 gets a graph of its own; the second bucket makes the
        # batch size symbolic, and that one compile serves every larger bucket. Each bucket is still
        # captured as its own CUDA graph (static shapes at replay). So warm-up costs two compiles.
        # Dynamo checks the step's guards before every replay: 6,381 of them on a 32-layer LLaMA, 16,828 with
        # 4-bit layers and an adapter (bitsandbytes' QuantState objects): 0.19-0.27 and 0.95-1.17 ms per step
        # on a 2-core CPU (benchmarks/guards_cpu.py). Skipping those on module attributes
        # (torch.compiler.skip_guard_on_all_nn_modules_unsafe) took that to 0.05 ms with the same tokens on the
        # CPU, but on an H200 the compiled step then gave other greedy tokens than the dynamic path from its
        # first step (tests/test_serve_static.py, BENCHMARKS.md): every guard stays until that is understood.
        self._step = (torch.compile(self._decode, options=self.options, fullgraph=False, dynamic=None)
                      if self.compiled else self._decode)
        self.warmup_s: dict[int, float] = {}
        self.warmup_calls_s: dict[int, list[float]] = {}  # per bucket: compile + run, capture, replay
        self.compile_cache: dict = {"state": "off"}
        # each step's argmax comes back through pinned memory, waited for on an event (not the stream):
        # a step launched after it keeps the GPU busy while the host reads and decodes these tokens
        cuda = self.device.type == "cuda"
        self.greedy_host = torch.zeros(slots, dtype=torch.long, pin_memory=cuda)
        self.ready = torch.cuda.Event() if cuda else None
        self.launched: tuple[int, torch.Tensor] | None = None  # (rows, logits [bucket, vocab]) of the last launch

    def _decode(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The step over slots 0..b-1 (its shapes depend on b only): logits [b, vocab] float32 and
        their argmax [b]."""
        columns = self.columns[:b]
        self.valid[:b].scatter_(1, columns, True)
        blocked = torch.finfo(self.dtype).min
        mask = torch.where(self.valid[:b], 0.0, blocked).to(self.dtype)[:, None, None, :]
        self.cache.rows, self.cache.columns, self.cache.attend = self.row_index[:b], columns, b
        out = self.model(input_ids=self.tokens[:b], attention_mask=mask, position_ids=self.positions[:b],
                         use_cache=True, **self.cache_kwargs)
        self.columns[:b].add_(1).clamp_(max=self.max_len - 1)  # free slots' padding rows never overflow
        self.positions[:b].add_(1)
        logits = out.logits[:, -1].float()
        greedy = logits.argmax(dim=-1)
        self.tokens[:b, 0].copy_(greedy)  # the next step's input, unless the host chooses otherwise
        return logits, greedy

    def describe(self) -> dict:
        """What the server reports: the decode path, its buckets, and the warm-up seconds."""
        return {"decode": "static, compiled" if self.compiled else "static", "batch_buckets": list(self.buckets),
                "cache_columns": self.max_len, "compile_warmup_s": round(sum(self.warmup_s.values()), 1),
                "compile_warmup_s_per_bucket": {str(b): s for b, s in self.warmup_s.items()},
                "compile_warmup_s_per_call": {str(b): s for b, s in self.warmup_calls_s.items()},
                "compile_cache": self.compile_cache["state"]}

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    @torch.no_grad()
    def decode(self, pending: list[int]) -> tuple[torch.Tensor, list[int]]:
        """One step for rows 0..n-1 with these pending tokens -> their logits [n, vocab] and argmax."""
        self.launch(len(pending), pending)
        logits, greedy = self.collect(logits=True)
        return logits, greedy

    @torch.no_grad()
    def launch(self, n: int, pending: list[int] | None) -> None:
        """Queue one step for rows 0..n-1 and return at once. `pending`: their input tokens, from the host;
        None: the argmax the previous step left in the token buffer (greedy rows need no round trip)."""
        if pending is not None:
            self.tokens[:n, 0].copy_(torch.tensor(pending, dtype=torch.long))
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        logits, greedy = self._step(self.bucket(n))
        self.greedy_host[:n].copy_(greedy[:n], non_blocking=self.ready is not None)
        if self.ready is not None:
            self.ready.record()
        self.launched = (n, logits)

    def collect(self, logits: bool) -> tuple[torch.Tensor | None, list[int]]:
        """Wait for the last launched step: its argmax per row, and its logits [n, vocab] when asked
        (copied: the next replay overwrites the graph's output). A step launched after it keeps running."""
        n, out = self.launched
        self.launched = None
        if self.ready is not None:
            self.ready.synchronize()
        return (out[:n].clone() if logits else None), self.greedy_host[:n].tolist()

    @torch.no_grad()
    def prefill(self, first_slot: int, prompts: list[list[int]], all_logits: bool) -> list[torch.Tensor]:
        """Prompts into slots first_slot.. (one left-padded forward); per prompt, the logits of its
        last position [1, vocab], or of every position [len, vocab] when `all_logits`."""
        width = max(len(p) for p in prompts)
        m = len(prompts)
        ids = torch.zeros(m, width, dtype=torch.long)
        real = torch.zeros(m, width, dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            real[i, width - len(p):] = True
        ids, real = ids.to(self.device), real.to(self.device)
        positions = (real.long().cumsum(1) - 1).clamp(min=0)
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        allowed = causal[None] & real[:, None, :]
        allowed |= torch.eye(width, dtype=torch.bool, device=self.device)[None]  # padding queries: themselves
        mask = torch.where(allowed, 0.0, torch.finfo(self.dtype).min).to(self.dtype)[:, None]
        slots = torch.arange(first_slot, first_slot + m, device=self.device)
        self.cache.rows, self.cache.attend = slots[:, None], None
        self.cache.columns = torch.arange(width, device=self.device)[None].expand(m, width)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            logits_to_keep=0 if all_logits else 1, **self.cache_kwargs).logits.float()
        self.valid[first_slot:first_slot + m] = False
        self.valid[first_slot:first_slot + m, :width] = real
        self.columns[first_slot:first_slot + m, 0] = width
        self.positions[first_slot:first_slot + m, 0] = torch.tensor([len(p) for p in prompts], device=self.device)
        return [logits[i, width - len(p):] if all_logits else logits[i, -1:] for i, p in enumerate(prompts)]

    def move_slot(self, source: int, target: int) -> None:
        """Slot `source`'s row now lives in slot `target` (compaction when a row leaves)."""
        self.cache.move_slot(source, target)
        for buffer in (self.tokens, self.columns, self.positions, self.valid):
            buffer[target].copy_(buffer[source])

    @torch.no_grad()
    def warm_up(self, cache_root: Path | None = None) -> float:
        """Run (and so compile and capture) the step of every bucket; seconds taken, also per bucket in
        `warmup_s`. The slots hold garbage afterwards, which every joining row overwrites. With
        `cache_root`, torch's compile artefacts are loaded from there first and saved there after a
        cold compile (compile_cache.py); `compile_cache` says which happened."""
        start = time.perf_counter()
        cache = None
        if cache_root is not None and self.compiled:
            key = cache_key(self.model, self.dtype, self.slots, self.max_len, self.buckets, self.options)
            cache = CompileCache(cache_root, key)
            self.compile_cache = cache.load()
        self.valid.zero_()
        self.valid[:, 0] = True
        for b in self.buckets:
            t0, calls = time.perf_counter(), []
            for _ in range(3):  # reduce-overhead: a warm-up run (compile), the capture, a replay
                self.columns.zero_(), self.positions.zero_()
                self.decode([0] * b)  # collects the step: waits for the GPU
                calls.append(round(time.perf_counter() - t0 - sum(calls), 2))
            self.warmup_s[b], self.warmup_calls_s[b] = round(time.perf_counter() - t0, 2), calls
        self.columns.zero_(), self.positions.zero_(), self.valid.zero_()
        if cache is not None and self.compile_cache["state"] != "hit":
            self.compile_cache.update(cache.save())
        total = time.perf_counter() - start
        log.info("static decode step %s for batch buckets %s in %.1f s (compile cache: %s)",
                 "compiled" if self.compiled else "ready", list(self.buckets), total, self.compile_cache["state"])
        return total


def start_decoder(model, compile_setting: bool, slots: int, max_len: int,
                  cache_root: Path | None = None) -> StaticDecoder | None:
    """The warmed-up static decoder the server uses on CUDA (None: the dynamic path: no CUDA,
    serve.compile false, or a model that is not a torch module, e.g. llama.cpp's GGUF form, which
    brings its own batch). The warm-up compiles every bucket, so no request waits for a compile;
    `cache_root`: where the compile artefacts are kept between starts (compile_cache.py)."""
    if not compile_setting or not isinstance(model, torch.nn.Module):
        return None
    if next(model.parameters()).device.type != "cuda":
        return None
    decoder = StaticDecoder(model, slots, max_len, compile=True)
    seconds = decoder.warm_up(cache_root)
    used = {"hit": "used", "miss": "none yet, saved now"}.get(decoder.compile_cache["state"],
                                                              decoder.compile_cache["state"])
    print(f"compiled the static decode step for batch buckets {list(decoder.buckets)} in {seconds:.1f} s "
          f"(per bucket: {decoder.warmup_s}; compile cache: {used}, {decoder.compile_cache.get('file')}; "
          f"Inductor's tuned kernels: {decoder.compile_cache.get('inductor_dir')})",
          flush=True)
    if note := decoder.compile_cache.get("note"):
        print(f"note: {note}", flush=True)
    return decoder


def plain_greedy(job: Job) -> bool:
    """True when the row's choice is the argmax of its raw logits (what `sampling.choose_token` returns
    for it): the step's one batched argmax then serves it, instead of one GPU sync per row."""
    p: SamplingParams = job.sampling
    return (p.temperature == 0 and p.logprobs is None and not p.logit_bias and p.repetition_penalty == 1.0
            and not p.presence_penalty and not p.frequency_penalty and len(job.tokens) >= p.min_tokens)


class StaticBatch(Rows):
    """The rows of `batch.Rows` over a `StaticDecoder`'s slots: the same rows, steps and choices as
    the dynamic `engine.Batch`, but rows that join are prefilled together at the next step, and
    leaving rows free their slot."""

    overlap = True  # launch the next step before the host reads this one (False: one step at a time)

    def __init__(self, model, tokenizer, decoder: StaticDecoder):
        self.model, self.tokenizer, self.decoder = model, tokenizer, decoder
        self.device = next(model.parameters()).device
        self.jobs: list[Job] = []
        self.pending: list[int] = []
        self.joining: list[Job] = []
        self.ahead: list[Job] | None = None  # the rows of a step launched but not read yet
        self.host_tokens = False  # a row's next input was chosen on the host (a prefill)

    def add(self, job: Job) -> None:
        """Queue `job` for the next step's prefill (it must fit a slot and the context)."""
        if len(self.jobs) + len(self.joining) >= self.decoder.slots:
            raise QLoraError(f"no free slot: {self.decoder.slots} rows already generate (serve.max_concurrent)")
        need = len(job.prompt_ids) + job.max_tokens
        if need > self.decoder.max_len:
            raise QLoraError(f"prompt ({len(job.prompt_ids)} tokens) + max_tokens ({job.max_tokens}) exceeds the "
                             f"static cache's {self.decoder.max_len} columns (serve.context_length)")
        bad = [t for t in job.prompt_ids if not 0 <= t < self.decoder.vocab]
        if bad or not job.prompt_ids:
            raise QLoraError(f"prompt token ids must be in [0, {self.decoder.vocab}); got {bad[:3] or 'none'}")
        job.generator = job.sampling.generator(self.device)
        self.joining.append(job)

    def _join(self) -> list[Job]:
        """The cancelled joining rows leave; the others are prefilled together (`_prefill`)."""
        cancelled = [j for j in self.joining if j.cancelled]
        for job in cancelled:
            finish(job, "cancelled")
        self.joining = [j for j in self.joining if not j.cancelled]
        return cancelled + (self._prefill() if self.joining else [])

    def _prefill(self) -> list[Job]:
        """Prefill the joining rows into the next free slots; returns those that ended at once."""
        joining, self.joining = self.joining, []
        for group in self._fitting_groups(joining):
            try:
                self._prefill_rows(group)
            except Exception:  # noqa: BLE001 - prefill them one by one: only a row that fails alone fails
                for job in group:
                    if job in self.jobs:
                        continue
                    try:
                        self._prefill_rows([job])
                    except Exception as exc:  # noqa: BLE001 - its client must hear about it
                        job.finish_reason = "error"
                        job.emit("error", f"generation failed: {type(exc).__name__}: {exc}")
        done = [j for j in joining if j.finish_reason == "error"]
        done += [j for j in self.jobs if j.finish_reason is not None]
        self._keep([j.finish_reason is None for j in self.jobs])
        return done

    def _fitting_groups(self, joining: list[Job]) -> list[list[Job]]:
        """Rows prefilled together share the longest prompt's width, and each then writes its answer
        after that width: group them so that every row's width + max_tokens fits the columns (a row
        alone always fits: `add` checked it)."""
        groups: list[list[Job]] = []
        for job in joining:
            for group in groups:
                width = max(len(j.prompt_ids) for j in group + [job])
                if all(width + j.max_tokens <= self.decoder.max_len for j in group + [job]):
                    group.append(job)
                    break
            else:
                groups.append([job])
        return groups

    def _greedy(self, job: Job, token: int) -> int:
        advance(job, token, self.tokenizer, None)
        return token

    def _prefill_rows(self, joining: list[Job]) -> None:
        all_logits = any(j.sampling.prompt_logprobs for j in joining)
        logits = self.decoder.prefill(len(self.jobs), [j.prompt_ids for j in joining], all_logits)
        for job, rows in zip(joining, logits):
            if job.sampling.prompt_logprobs:
                self._record_prompt_logprobs(job, rows)
            self.jobs.append(job)
            self.pending.append(self._choose(job, rows[-1]))
        self.host_tokens = True

    @torch.no_grad()
    def step(self) -> list[Job]:
        """`Rows.step`; then the next step is launched before this call returns (with the tokens the host
        chose, when `_next_tokens` launched none), so the GPU computes it while the engine admits rows."""
        done = super().step()
        if self.overlap and self.ahead is None and self.jobs:
            self._launch(self.pending)
        return done

    def _next_tokens(self) -> list[int]:
        """Read the step launched last (launching it now if none was). When every row is plain greedy,
        the following step is launched before this one's tokens are decoded on the host: its input is
        the argmax the GPU already holds; a row that ends here computes one token too many there, which
        nobody reads."""
        if self.ahead is not None and not any(j.finish_reason is None for j in self.ahead):
            self.ahead = self.decoder.launched = None  # its rows have all ended: nothing to read
        if self.ahead is None:
            self._launch(self.pending)
        rows, self.ahead = self.ahead, None
        exact = [plain_greedy(j) for j in rows]
        logits, greedy = self.decoder.collect(logits=not all(exact))
        if self.overlap and all(exact) and not self.host_tokens and set(self.jobs) <= set(rows):
            self._launch(None)  # the GPU computes the next step while the host decodes this one's tokens
        chosen = {}
        for i, job in enumerate(rows):
            if job.finish_reason is None:
                chosen[job] = self._greedy(job, greedy[i]) if exact[i] else self._choose(job, logits[i])
        return [chosen.get(j, p) for j, p in zip(self.jobs, self.pending)]

    def _launch(self, pending: list[int] | None) -> None:
        """Launch a step over the current rows; `pending` None: their inputs are already on the GPU."""
        self.decoder.launch(len(self.jobs), pending)
        self.ahead = list(self.jobs)
        self.host_tokens = self.host_tokens and pending is None

    def _drop(self, keep: list[bool]) -> None:
        """Keep the rows marked True in slots 0..k-1: each leaving row's slot takes the last row."""
        if not any(keep):  # every row leaves (also after a failed step): nothing to move
            self.jobs, self.pending = [], []
            return
        jobs, pending = list(self.jobs), list(self.pending)
        keep = list(keep)
        i = 0
        while i < len(jobs):
            if keep[i]:
                i += 1
                continue
            last = len(jobs) - 1
            if i != last:
                self.decoder.move_slot(last, i)
                jobs[i], pending[i], keep[i] = jobs[last], pending[last], keep[last]
            jobs.pop(), pending.pop(), keep.pop()
        self.jobs, self.pending = jobs, pending

    def fail(self, message: str) -> None:
        self.ahead, self.decoder.launched, self.host_tokens = None, None, False
        for job in self.joining:
            job.finish_reason = "error"
            job.emit("error", message)
        self.joining = []
        super().fail(message)
