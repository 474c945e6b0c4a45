"""Where a compile warm-up's seconds go (issue 26, restarts): a sampling profiler of the main thread
and torch's own compile metrics, for `engine_vs_transformers.py --warm-only --profile-warmup`.

The sampler reads the main thread's Python stack every `interval` seconds from a side thread (what
py-spy does, without the dependency; cProfile would slow Dynamo's tracing, the thing measured) and
counts each function once per sample it is on the stack in: `inclusive` seconds per function, and
per phase (the first phase function found from the top of the stack: Dynamo's tracing, AOTAutograd,
Inductor's cache lookup and kernel loading, Triton, CUDA graph capture, the model's forward).
"""

from __future__ import annotations

import collections
import sys
import threading
import time

# (phase, substrings of "file:function" marking it), checked from the innermost frame outwards: the
# innermost phase wins (a Triton load inside Inductor inside Dynamo counts as the Triton load).
PHASES = [
    ("triton: load or compile kernels", ("triton/compiler", "triton/runtime", "static_autotuner",
                                         "CachingAutotuner.precompile", "async_compile")),
    ("inductor: autotune / benchmark", ("benchmark_all_configs", "coordinate_descent", "autotune_to_one_config")),
    ("cudagraph capture / record", ("cudagraph_trees", "cudagraphs")),
    ("inductor: FX graph cache (lookup, load output code)", ("FxGraphCache", "codecache:load", "PyCodeCache")),
    ("aot_autograd: cache key + trace", ("_aot_autograd", "aot_autograd", "AOTAutogradCache")),
    ("inductor: compile (passes, codegen)", ("_inductor/",)),
    ("dynamo: guards", ("guards",)),
    ("dynamo: tracing", ("_dynamo/",)),
    ("model / step run (eager parts)", ("transformers/", "qlora_helpers/", "peft/", "bitsandbytes/")),
]


def _label(frame) -> str:
    code = frame.f_code
    return f"{code.co_filename.split('site-packages/')[-1]}:{getattr(code, 'co_qualname', code.co_name)}"


class Sampler:
    def __init__(self, interval: float = 0.005):
        self.interval, self.target = interval, threading.main_thread().ident
        self.inclusive: collections.Counter = collections.Counter()
        self.phases: collections.Counter = collections.Counter()
        self.samples, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self.start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self.start

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self.target)
            stack = []
            while frame is not None:
                stack.append(_label(frame))
                frame = frame.f_back
            self.samples += 1
            self.inclusive.update(set(stack))
            self.phases[self._phase(stack)] += 1

    @staticmethod
    def _phase(stack: list[str]) -> str:
        for label in stack:  # innermost first
            for phase, marks in PHASES:
                if any(m in label for m in marks):
                    return phase
        return "other (python outside torch's compiler)"

    def report(self, top: int = 40) -> dict:
        scale = self.seconds / max(1, self.samples)
        return {"seconds": round(self.seconds, 2), "samples": self.samples,
                "phases_s": {k: round(v * scale, 2) for k, v in self.phases.most_common()},
                "inclusive_s": {k: round(v * scale, 2) for k, v in self.inclusive.most_common(top)}}


def compile_metrics() -> dict:
    """torch's own account: per compiled frame (Dynamo, AOTAutograd, Inductor, cache hits) and the
    aggregated timers."""
    import torch._dynamo.utils as utils

    fields = ("co_name", "frame_key", "entire_frame_compile_time_s", "backend_compile_time_s",
              "inductor_compile_time_s", "code_gen_time_s", "dynamo_cumulative_compile_time_us",
              "aot_autograd_cumulative_compile_time_us", "inductor_cumulative_compile_time_us",
              "triton_compile_time_us", "runtime_cudagraphify_time_us", "runtime_triton_autotune_time_us",
              "inductor_fx_local_cache_hit_count", "inductor_fx_local_cache_miss_count",
              "aotautograd_local_cache_hit_count", "aotautograd_local_cache_miss_count", "graph_op_count",
              "guard_latency_us", "restart_reasons", "gc_time_us", "duration_us")
    frames = [{f: _plain(getattr(m, f, None)) for f in fields} for m in utils.get_compilation_metrics()]
    try:
        timers = utils.compile_times(repr="str", aggregate=True)
    except Exception as exc:  # noqa: BLE001 - a profile, not a measurement the run depends on
        timers = f"compile_times unavailable: {exc}"
    return {"frames": frames, "timers": timers}


def _plain(value):
    return sorted(value) if isinstance(value, set) else value


def main() -> None:
    """A cold or cached warm-up of the static decode step of a narrow LLaMA with `--layers` decoder layers
    (the 7B's 32 by default: Dynamo traces the same Python per layer whatever the width), on whatever device
    is there, profiled. Run it twice with a fresh TORCHINDUCTOR_CACHE_DIR each and the same --cache-root:
    the first compiles and saves the artefacts, the second loads them (as a server restart does)."""
    import argparse
    import json
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's qlora_helpers
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_helpers.serve.static import StaticDecoder

    parser = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--cache-root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=args.layers, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device).eval()
    decoder = StaticDecoder(model, slots=1, max_len=192, compile=True, buckets=(1,))
    start = time.perf_counter()
    with Sampler() as sampler:
        decoder.warm_up(args.cache_root)
    result = {"device": device, "torch": torch.__version__, "layers": args.layers,
              "warm_up_s": round(time.perf_counter() - start, 2), **decoder.describe(),
              "cache": decoder.compile_cache, "sampler": sampler.report(), **compile_metrics()}
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps({k: result[k] for k in ("warm_up_s", "compile_cache")}), json.dumps(result["sampler"]["phases_s"]))


if __name__ == "__main__":
    main()
