"""One-row NF4 matmuls of the LLaMA-2-7B projections, four ways (issue 26): bitsandbytes' own kernel (what
the 4-bit form's compiled step calls), the 16-bit weight's compiled matmul for scale, and two tries at
beating bitsandbytes, kept here as the experiments they were: the de-quantization written in torch
operations for Inductor to fuse into its tuned one-row reduction (`--inductor`), and a Triton kernel that
reads bitsandbytes' packed layout in place (`nf4_gemv` below, with the code looked up per 4-bit code or per
byte). Neither beat bitsandbytes on the H200 (BENCHMARKS.md), so the package does not use them.

Each candidate is captured 64 times in a row into one CUDA graph and replayed, so launch overhead is out
of the figure; GB/s counts the bytes each must read (packed nibbles + 8-bit absmax + the second-level
scales for NF4, the 16-bit weight for bf16). Also the largest difference to `F.linear(x, dequantize_4bit(W))`.

The layout (bitsandbytes/backends/default/ops.py, its reference implementation): the weight `[out, in]`
flattened row-major, two 4-bit codes per byte (the first in the high nibble), `code[q]` in fp32 times the
block's absmax (64 consecutive values); with double quantization the absmax is 8-bit:
`code2[absmax_q] * absmax2[block // 256] + offset`.

    python benchmarks/nf4_gemv.py --out nf4_gemv.json [--inductor]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference_latency import copy_bandwidth  # noqa: E402 - the script's sibling

SHAPES = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}


def dequantize_ops(packed, absmax, code, shape, absmax2, code2, offset, blocksize=64, blocksize2=256,
                   dtype=torch.bfloat16):
    """bitsandbytes' de-quantization in torch operations (what --inductor compiles in front of the matmul)."""
    rows, cols = shape
    shifts = torch.tensor([4, 0], dtype=torch.uint8, device=packed.device)
    q = ((packed.reshape(-1, 1) >> shifts) & 0xF).reshape(rows, cols // blocksize, blocksize)
    block = torch.arange(absmax.numel(), device=absmax.device) // blocksize2
    scale = (code2[absmax.long()] * absmax2[block] + offset).reshape(rows, cols // blocksize, 1)
    return (code[q.long()] * scale).reshape(rows, cols).to(dtype)


@functools.cache
def _kernel():
    """The Triton kernel: each program streams BLOCK_N weight rows once, 32-bit words of eight codes,
    sums code x input per 64-value block in fp32, then scales by the block's absmax."""
    import triton
    import triton.language as tl

    configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
               for n in (4, 8, 16, 32) for k in (64, 128, 256, 512, 1024) for w in (4, 8)]

    @triton.autotune(configs=configs, key=["N", "K", "PAIRS"], prune_configs_by={"early_config_prune": _fitting})
    @triton.jit
    def nf4_gemv(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, out_ptr, offset, N, K: tl.constexpr,
                 BS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr, PAIRS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = rows < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            words = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            w = tl.load(w_ptr + rows[:, None] * (K // 8) + words[None, :], mask=live[:, None], other=0)
            if PAIRS:  # one lookup per byte: a 64-bit entry holding both codes' fp32 values, first code low
                byte = (w[:, :, None] >> (tl.arange(0, 4) * 8)[None, None, :]) & 0xFF
                pair = tl.reshape(tl.load(code_ptr + byte), (BLOCK_N, BLOCK_K // BS, BS // 2))
                first = pair.to(tl.uint32).to(tl.float32, bitcast=True)
                second = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
                half = k0 + 2 * tl.arange(0, BLOCK_K // 2)
                x_first = tl.reshape(tl.load(x_ptr + half).to(tl.float32), (1, BLOCK_K // BS, BS // 2))
                x_second = tl.reshape(tl.load(x_ptr + half + 1).to(tl.float32), (1, BLOCK_K // BS, BS // 2))
                part = tl.sum(first * x_first + second * x_second, axis=2)
            else:  # one lookup per code: the 8 codes of a little-endian word, first code in the high nibble
                element = tl.arange(0, 8)
                shift = (element // 2) * 8 + (1 - element % 2) * 4
                q = (w[:, :, None] >> shift[None, None, :]) & 0xF
                v = tl.reshape(tl.load(code_ptr + q), (BLOCK_N, BLOCK_K // BS, BS))
                x = tl.reshape(tl.load(x_ptr + k0 + tl.arange(0, BLOCK_K)).to(tl.float32), (1, BLOCK_K // BS, BS))
                part = tl.sum(v * x, axis=2)  # [BLOCK_N, blocks]: each block's sum before its scale
            block = rows[:, None] * (K // BS) + (k0 // BS + tl.arange(0, BLOCK_K // BS))[None, :]
            if NESTED:
                q8 = tl.load(absmax_ptr + block, mask=live[:, None], other=0).to(tl.int32)
                scale = tl.load(code2_ptr + q8) * tl.load(absmax2_ptr + block // BS2, mask=live[:, None],
                                                          other=0.0) + offset
            else:
                scale = tl.load(absmax_ptr + block, mask=live[:, None], other=0.0)
            acc += tl.sum(part * scale, axis=1)
        tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=live)

    return nf4_gemv


def _fitting(configs, named_args, **kwargs):
    """Autotune only the tile widths that divide the row (and hold whole absmax blocks)."""
    k, bs = named_args["K"], kwargs.get("BS", 64)
    return [c for c in configs if k % c.kwargs["BLOCK_K"] == 0 and c.kwargs["BLOCK_K"] % bs == 0] or configs[:1]


def code_pairs(code: torch.Tensor) -> torch.Tensor:
    """The 256 bytes' two fp32 code values as one int64 each (the byte's first code, its high nibble, in the
    low 32 bits): the kernel's one-lookup-per-byte table."""
    byte = torch.arange(256, device=code.device)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=1).contiguous().view(torch.int64).reshape(256)


def triton_gemv(x: torch.Tensor, layer, pairs: bool) -> torch.Tensor:
    """One row through `nf4_gemv` (double-quantized NF4 only, as this benchmark builds it)."""
    state = layer.weight.quant_state
    rows, cols = state.shape
    out = torch.empty(rows, dtype=x.dtype, device=x.device)
    table = layer.nf4_pairs if pairs else layer.nf4_code
    _kernel()[lambda meta: ((rows + meta["BLOCK_N"] - 1) // meta["BLOCK_N"],)](
        x.reshape(-1), layer.nf4_words, state.absmax, layer.nf4_absmax2, layer.nf4_code2, table, out,
        float(state.offset), rows, cols, BS=state.blocksize, BS2=state.state2.blocksize, NESTED=True, PAIRS=pairs)
    return out


def graph_time(fn, calls: int = 64, replays: int = 20) -> float:
    """Seconds per call of `fn` (no arguments), replayed from one CUDA graph of `calls` calls."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (replays * calls)


def measure(name: str, out_f: int, in_f: int, bandwidth: float, inductor: bool) -> list[dict]:
    """One projection shape: each path's time per call, bandwidth, and difference to the reference."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    dense = torch.randn(out_f, in_f, dtype=torch.bfloat16) * 0.02
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(dense, requires_grad=False, quant_type="nf4", compress_statistics=True)
    layer = layer.cuda().eval()
    state = layer.weight.quant_state
    layer.nf4_words = layer.weight.data.reshape(-1).view(torch.int32)
    layer.nf4_code = state.code.float().contiguous()
    layer.nf4_pairs = code_pairs(layer.nf4_code)
    layer.nf4_absmax2 = state.state2.absmax.float().contiguous()
    layer.nf4_code2 = state.state2.code.float().contiguous()
    x = torch.randn(1, 1, in_f, dtype=torch.bfloat16, device="cuda")
    reference = torch.nn.functional.linear(x, dequantize_4bit(layer.weight.data, state))
    packed_bytes = layer.weight.numel() + state.absmax.numel() + state.state2.absmax.numel() * 4
    paths = {"bitsandbytes": lambda: bnb.matmul_4bit(x, layer.weight.t(), quant_state=state)}
    deq = dequantize_4bit(layer.weight.data, state)
    paths["bf16 compiled"] = torch.compile(lambda: torch.nn.functional.linear(x, deq),
                                           options={"coordinate_descent_tuning": True}, fullgraph=True)
    if inductor:
        paths["torch ops, fused by Inductor"] = torch.compile(
            lambda: torch.nn.functional.linear(x, dequantize_ops(
                layer.weight.data, state.absmax, layer.nf4_code, tuple(state.shape), layer.nf4_absmax2,
                layer.nf4_code2, torch.as_tensor(state.offset, device="cuda"))),
            options={"coordinate_descent_tuning": True}, fullgraph=True)
    paths["triton, lookup per byte"] = lambda: triton_gemv(x, layer, True)
    paths["triton, lookup per code"] = lambda: triton_gemv(x, layer, False)
    rows, diffs = [], {}
    with torch.no_grad():
        for path, fn in paths.items():
            out = fn()  # compiles / autotunes before the capture
            diffs[path] = (out.reshape(-1).float() - reference.reshape(-1).float()).abs().max().item()
            seconds = graph_time(fn)
            size = out_f * in_f * 2 if path.startswith("bf16") else packed_bytes
            rows.append({"shape": name, "out": out_f, "in": in_f, "path": path, "us": round(seconds * 1e6, 2),
                         "gb_s": round(size / seconds / 1e9, 1), "of_copy": round(size / seconds / bandwidth, 3)})
            print(rows[-1], flush=True)
    rows.append({"shape": name, "tuned": {str(k): str(v) for k, v in _kernel().cache.items()},
                 "max_abs_diff": diffs, "reference_abs_max": reference.abs().max().item()})
    print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--inductor", action="store_true", help="also the torch-ops de-quantization, compiled")
    args = parser.parse_args()

    import bitsandbytes as bnb

    torch.manual_seed(0)
    bandwidth = copy_bandwidth("cuda")
    rows = [{"machine": torch.cuda.get_device_name(), "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
             "torch": torch.__version__, "bitsandbytes": bnb.__version__}]
    print(rows[0], flush=True)
    for name, (out_f, in_f) in SHAPES.items():
        rows += measure(name, out_f, in_f, bandwidth, args.inductor)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
