"""llama.cpp as a serving form: a GGUF file's forward pass behind our own engine.

Only the forward pass moves to llama.cpp (through llama-cpp-python's ctypes binding of its C API,
`llama_decode` on a batch that holds one sequence per row). Everything else stays the server's:
the tokenizer (the run's transformers tokenizer; the export gate records that llama.cpp tokenizes
the probes the same way), the chat rule, sampling (`sampling.py` on llama.cpp's logits), stop
strings, logprobs and the scheduler, so the API behaves exactly as with the transformers forms.
`LlamaCppBatch` is the engine's batch for this backend (`batch.Rows`): each row is a llama.cpp sequence id with
its own KV cells, so rows join (their prompt decoded alone) and leave (their cells dropped)
between steps, and one `llama_decode` per step advances every row.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import torch

from ..errors import QLoraError
from ..runs import Run
from .batch import Job, Rows
from .gguf import cpu_threads, export_gguf, gguf_path, gguf_staleness, model_params, quiet_logs, require_llama_cpp
from .run import context_length, say


class LlamaCppModel:
    """A GGUF file loaded by llama.cpp with room for `rows` sequences of `context` tokens each."""

    def __init__(self, path: str | Path, context: int, rows: int, threads: int | None = None):
        lib = require_llama_cpp()
        quiet_logs(lib)
        self.lib, self.path, self.context, self.rows = lib, Path(path), context, rows
        if not self.path.is_file():
            raise QLoraError(f"No GGUF file at {self.path}: export it first (python -m qlora_helpers export "
                             f"--run <run> --gguf q8_0).")
        lib.llama_backend_init()
        self.model = lib.llama_model_load_from_file(str(self.path).encode(), model_params(lib))
        if not self.model:
            raise QLoraError(f"llama.cpp could not load {self.path}.")
        params = lib.llama_context_default_params()
        params.n_seq_max = rows
        params.n_ctx = -(-context // 256) * 256 * rows  # llama.cpp pads each row's cells to 256
        params.kv_unified = False  # each row its own cells: rows share no prefix
        params.n_batch = params.n_ubatch = max(min(context, 512), rows)
        params.n_threads = params.n_threads_batch = threads or cpu_threads()
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise QLoraError(f"llama.cpp could not create a context of {rows} x {context} tokens for {self.path}.")
        self.n_batch = params.n_batch
        self.memory = lib.llama_get_memory(self.ctx)
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.batch = lib.llama_batch_init(self.n_batch, 0, 1)
        # what the API asks a model: its vocabulary and the longest context it was trained on
        self.config = types.SimpleNamespace(vocab_size=self.n_vocab,
                                            max_position_embeddings=lib.llama_model_n_ctx_train(self.model))

    def new_batch(self, tokenizer) -> LlamaCppBatch:
        """The engine's seam (`engine.new_batch`): this backend's rows."""
        return LlamaCppBatch(self, tokenizer)

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization of `text` (special tokens parsed, BOS as the GGUF says)."""
        data = text.encode("utf-8")
        out = (self.lib.llama_token * (len(data) + 8))()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), out, len(out), True, True)
        if n < 0:
            raise QLoraError(f"llama.cpp could not tokenize a text of {len(data)} bytes.")
        return list(out[:n])

    def forget(self, seq: int) -> None:
        self.lib.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> list[torch.Tensor]:
        """One `llama_decode` over (token, position, sequence, wants logits) entries; the float32
        logits [vocab] of those that want them, in order."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (token, pos, seq, wants) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, int(wants)
            b.seq_id[i][0] = seq
        code = self.lib.llama_decode(self.ctx, b)
        if code != 0:
            raise QLoraError(f"llama_decode returned {code} (1: no room left in the KV cache of "
                             f"{self.rows} x {self.context} tokens).")
        out = []
        for i, (_, _, _, wants) in enumerate(entries):
            if wants:
                ptr = self.lib.llama_get_logits_ith(self.ctx, i)
                out.append(torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()))
        return out

    def prefill(self, ids: list[int], seq: int, all_logits: bool = False) -> torch.Tensor:
        """Decode a prompt into sequence `seq` (in chunks of n_batch); logits [positions, vocab] at
        every position when `all_logits`, else at the last one only ([1, vocab])."""
        self.forget(seq)
        rows = []
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start:start + self.n_batch]
            last = start + len(chunk) == len(ids)
            rows += self.decode([(t, start + i, seq, all_logits or (last and i == len(chunk) - 1))
                                 for i, t in enumerate(chunk)])
        return torch.stack(rows)

    def logits(self, ids: list[int], start: int) -> torch.Tensor:
        """Teacher-forced logits of `ids` at positions start.. (the export gate's measurement)."""
        try:
            return self.prefill(ids, 0, all_logits=True)[start:]
        finally:
            self.forget(0)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = None

    def __del__(self):
        if getattr(self.lib, "llama_free", None) is not None:  # not at interpreter shutdown
            self.close()


class LlamaCppBatch(Rows):
    """The engine's rows on llama.cpp: each job holds a sequence id; its pending token is fed at
    the next step at position `positions[job]`."""

    def __init__(self, model: LlamaCppModel, tokenizer):
        self.model, self.tokenizer, self.device = model, tokenizer, torch.device("cpu")
        self.jobs: list[Job] = []
        self.pending: list[int] = []
        self.free = list(range(model.rows))
        self.seq: dict[int, int] = {}        # id(job) -> sequence id
        self.position: dict[int, int] = {}   # id(job) -> position of its pending token

    def add(self, job: Job) -> None:
        if not self.free:
            raise QLoraError(f"All {self.model.rows} llama.cpp sequences are in use (serve.max_concurrent).")
        job.generator = job.sampling.generator(self.device)
        seq = self.free.pop()
        try:
            logits = self.model.prefill(job.prompt_ids, seq, all_logits=bool(job.sampling.prompt_logprobs))
            if job.sampling.prompt_logprobs:
                self._record_prompt_logprobs(job, logits)
            token = self._choose(job, logits[-1])
        except BaseException:
            self._release(seq)
            raise
        if job.finish_reason is not None:
            return self._release(seq)
        self.jobs.append(job)
        self.pending.append(token)
        self.seq[id(job)], self.position[id(job)] = seq, len(job.prompt_ids)

    def _release(self, seq: int) -> None:
        self.model.forget(seq)
        self.free.append(seq)

    def _next_tokens(self) -> list[int]:
        rows = self.model.decode([(t, self.position[id(j)], self.seq[id(j)], True)
                                  for j, t in zip(self.jobs, self.pending)])
        for job in self.jobs:
            self.position[id(job)] += 1
        return [self._choose(job, row) for job, row in zip(self.jobs, rows)]

    def _drop(self, keep: list[bool]) -> None:
        """Keep the rows marked True; the others' sequences are forgotten and free again."""
        for job, k in zip(self.jobs, keep):
            if not k:
                self._release(self.seq.pop(id(job)))
                self.position.pop(id(job))
        self.jobs = [j for j, k in zip(self.jobs, keep) if k]
        self.pending = [t for t, k in zip(self.pending, keep) if k]


def load_gguf_serving(run: Run) -> LlamaCppModel:
    """The run's served GGUF (serve.gguf's first type; exported first, saying why, when missing or older
    than merged/), with a sequence per serve.max_concurrent row of the run's context. The merged model
    must be there. The Ollama Modelfile is left as the export wrote it: a file written here for serving
    has not been through the export gate (serve_run warns about that)."""
    if not run.cfg.serve.gguf:
        raise QLoraError("serve.form=gguf but serve.gguf is empty: name the GGUF type to serve, "
                         "e.g. --set 'serve.gguf=[q8_0]'.")
    served = run.cfg.serve.gguf[0]
    path = gguf_path(run, served)
    stale = gguf_staleness(run, served)
    if stale:
        say(f"exporting {path.name} for serving ({stale}); {run.modelfile.name} is left as it is")
        export_gguf(run, [served], modelfile_too=False)
    return LlamaCppModel(path, context_length(run), run.cfg.serve.max_concurrent)
