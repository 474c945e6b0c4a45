"""A restart of the static decoder's compiled step on the CPU, cold then cached (issue 26, item 2),
each in a fresh process with an empty Inductor cache folder of its own (as a new machine or container),
so only the artefact file `StaticDecoder.warm_up(cache_root)` saved can help the second start.

    python benchmarks/restart_cpu.py cold 0 /tmp/cc && python benchmarks/restart_cpu.py cached 0 /tmp/cc
    python benchmarks/restart_cpu.py cold 1 /tmp/cc1 && python benchmarks/restart_cpu.py cached 1 /tmp/cc1

The second argument turns on torch's `caching_precompile` (Dynamo's bytecode and guards saved with the
other artefacts, which should skip Dynamo's tracing on a restart). ONE_GRAPH=1 compiles the step with
the batch size symbolic from the first bucket on (`dynamic=True`): one traced graph instead of bucket 1's
own plus a symbolic one. BESIDE=1 leaves TORCHINDUCTOR_CACHE_DIR unset, so the decoder keeps Inductor's
folder beside the file in `root` (what a server start does since compile_cache.use_inductor_dir). A tiny
random LLaMA with L layers (env L, default 16) stands in for the model: the tracing cost grows with
layers, not with width. Prints
one JSON line: warm-up seconds per bucket, the compile cache's state and Dynamo's frame counters (a
traced frame shows up in `frames`, a frame served from a saved cache does not).
"""

import json
import os
import sys
import tempfile
import time

mode, precompile, root = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
if os.environ.get("BESIDE") == "1":  # the decoder's default: Inductor's folder beside the file, in `root`
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
else:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")  # nothing carried but the file

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from qlora_helpers.serve.static import StaticDecoder  # noqa: E402

torch._dynamo.config.caching_precompile = precompile
torch.manual_seed(0)
layers = int(os.environ.get("L", 16))
config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
decoder = StaticDecoder(LlamaForCausalLM(config).eval(), slots=4, max_len=64, compile=True, tune=False)
one_graph = os.environ.get("ONE_GRAPH") == "1"
if one_graph:  # the batch size symbolic from the first bucket on: one traced graph instead of two
    decoder._step = torch.compile(decoder._decode, options=decoder.options, fullgraph=False, dynamic=True)
start = time.perf_counter()
with torch.no_grad():
    decoder.warm_up(root)
print(json.dumps({"mode": mode, "caching_precompile": precompile, "one_graph": one_graph,
                  "beside": os.environ.get("BESIDE") == "1", "layers": layers,
                  "torch": torch.__version__, "warm_up_s": round(time.perf_counter() - start, 2),
                  "per_bucket_s": decoder.warmup_s,
                  "compile_cache": {k: v for k, v in decoder.compile_cache.items() if k != "file"},
                  "dynamo_frames": dict(counters["frames"]), "graphs": counters["stats"].get("unique_graphs", 0)}))
