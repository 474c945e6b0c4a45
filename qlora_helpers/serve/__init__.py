"""Stage 06: serve the tuned model, one job per module.

- `engine`: scheduling and generation (no HTTP): a bounded queue in front of one generating thread.
- `batch`: a job's state and the decode step every backend's batch shares (dynamic, static, llama.cpp).
- `api`: the OpenAI-compatible FastAPI app: request models, errors in OpenAI's shape, the routes.
- `export`: de-quantize-then-merge, the merge check, the files vLLM and TGI load.
- `forms`: the registry of serving forms (adapter, merged, each GGUF type): loading, auto, KL bounds.
- `gguf`: GGUF files through llama.cpp's own converter (the [gguf] extra) and the Ollama Modelfile.
- `gate`: the export gate: every exported form against the adapter model (`export.json`).
- `llamacpp`: llama.cpp as a serving form (a GGUF's forward pass behind our engine).
- `process`: `serve_run` under uvicorn, and `ServerProcess` to start and stop it from Python.
- `widgets`: the notebook's streamed generation and chat box.
- `checks`: client-side smoke, load and latency checks that return results.

What notebook 06, the CLI, the benchmarks and the tests use is re-exported here.
"""

from .checks import (
                     bench_prompts,
                     compare_forms,
                     load_test,
                     machine_name,
                     measure_generation,
                     plain_request,
                     save_serve_results,
                     smoke_test,
                     stream_request,
)
from .engine import BatchEngine, Job, QueueFull, generate_jobs
from .export import export_commands, load_merged, merge_adapter, merge_and_export, probe_logits
from .forms import choose_form, load_serving_model
from .gate import export_and_check, gate_summary, gate_table, run_export_gate
from .gguf import export_gguf, gguf_available
from .process import ServerProcess, serve_run, start_server
from .run import api_key_from_env, context_length, model_name, open_run_folder
from .widgets import chat_box, prompt_for, stream_text

__all__ = ["BatchEngine", "Job", "QueueFull", "ServerProcess", "api_key_from_env", "bench_prompts", "chat_box",
           "choose_form", "compare_forms", "context_length", "export_and_check", "export_commands",
           "export_gguf", "gate_summary", "gate_table", "generate_jobs", "gguf_available", "load_merged",
           "load_serving_model", "load_test", "machine_name", "measure_generation", "merge_adapter",
           "merge_and_export", "model_name", "open_run_folder", "plain_request", "probe_logits", "prompt_for",
           "run_export_gate", "save_serve_results", "serve_run", "smoke_test", "start_server",
           "stream_request", "stream_text"]
