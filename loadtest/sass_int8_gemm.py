"""The W8A8 GEMM's epilogues in machine code, without a GPU: SASS instruction mix per BERT GEMM (sm_90).

Compiles ``int8_kernels._w8a8_kernel`` for an H100/H200 (``GPUTarget("cuda", 90, 32)``) with the
tiles and epilogue flags BERT's INT8 runtime launches at a batch of 128 x 128 tokens (the same calls as
``bench_int8_gemm_gpu.bert_call``), disassembles the cubin with the ``nvdisasm`` that ships in the
``triton`` wheel and counts instructions by opcode, grouped by the unit that issues them. Each GEMM is
compiled three ways: no epilogue (scales only, the floor), the fp32 epilogue, and the fp16-pair one
(``half_epilogue``); the rows print the epilogue's instructions over the floor, and the wgmma waits
(how many MMA groups each leaves in flight). Then ``int8_gluon``'s kernel for the shapes it takes.

What it is for: the eighth session found the up projection's epilogue bound on the FMA pipe (moving work
off MUFU or the conversion unit onto it made it slower), so an epilogue change can be judged here by the
FMA-pipe count before a GPU is at hand. Counts are static (per program, the kernel's straight-line code):
they rank epilogues, they do not time them: ``bench_int8_gemm_gpu.py`` and ``profile_bert_gpu.py`` do.

    PYTHONPATH=backends:. python loadtest/sass_int8_gemm.py [--json out.json] [--all-tiles]

It compiles with the installed triton (requirements.lock: 3.7.1); the GPU machine's is 3.6.0, whose
counts docs/benchmarks.md shows (``pip install --no-deps triton==3.6.0 --target DIR``, DIR first on
PYTHONPATH).
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "backends")]

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from trident.models import int8_kernels  # noqa: E402

M = 16384  # tokens: a batch of 128 x 128
ROWS = (1, 16, 32, 64, 128, 512, 16384)  # --all-tiles: one row count per branch of int8_kernels.w8a8_tiles
SHAPES = {"qkv": (2304, 768), "attn_out": (768, 768), "up": (3072, 768), "down": (768, 3072)}
# The unit each opcode issues to (Hopper). IMAD shares the FMA pipe; fp16 pairs too.
UNITS = {
    "fma": ("FFMA", "FMUL", "FADD", "HFMA2", "HMUL2", "HADD2", "IMAD"),
    "alu": ("FMNMX", "HMNMX2", "ISETP", "FSETP", "IADD3", "LOP3", "SHF", "PRMT", "SEL", "FSEL", "MOV", "LEA", "VIADD"),
    "mufu": ("MUFU",),
    "cvt": ("I2FP", "F2FP", "F2I", "I2F", "F2F"),
}
NVDISASM = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"


def flags(name: str, epilogue: str) -> dict:
    """The runtime's epilogue for ``name`` (bench_int8_gemm_gpu.bert_call): per-row input scales on QKV
    and up, static steps folded into the weight scales on attn_out and down; bias everywhere; tanh GELU
    and an int8 output on up; the LayerNorm'd residual on attn_out and down. "none": scales only."""
    dynamic = name in ("qkv", "up")
    if epilogue == "none":
        return dict(HAS_X_SCALE=dynamic, HAS_BIAS=False, HAS_RESIDUAL=False, NORM_RESIDUAL=False, GELU="",
                    QUANTIZE_OUT=False, HALF=False)
    residual = name in ("attn_out", "down")
    return dict(HAS_X_SCALE=dynamic, HAS_BIAS=True, HAS_RESIDUAL=residual, NORM_RESIDUAL=residual,
                GELU="tanh" if name == "up" else "", QUANTIZE_OUT=name == "up", HALF=epilogue == "f16x2")


def compile_gemm(name: str, epilogue: str, m: int = M):
    n, k = SHAPES[name]
    t = int8_kernels.w8a8_tiles(m, n, k)
    f = flags(name, epilogue)
    out_type = "i8" if f["QUANTIZE_OUT"] else "fp16"
    edge = [t.block_m, t.block_n // 2 if t.is_subtiled else t.block_n]
    desc = (lambda dtype, shape: f"tensordesc<{dtype}{shape}>") if t.is_tma else (lambda dtype, shape: f"*{dtype}")
    types = {"x": desc("i8", [t.block_m, t.block_k]), "w": desc("i8", [t.block_n, t.block_k]),
             "r_ptr": desc("fp16", edge), "out_ptr": desc(out_type, edge), "b_ptr": "*fp16", "rg_ptr": "*fp16",
             "rb_ptr": "*fp16", "xs_ptr": "*fp32", "ws_ptr": "*fp32", "qs_ptr": "*fp32", "rs_ptr": "*fp32"}
    constants = dict(f, IS_TMA=t.is_tma, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
                     GROUP_M=t.group_m, FLATTEN=t.is_persistent, SUBTILE=t.is_subtiled,
                     WARP_SPECIALIZE=t.is_warp_specialized)
    names = int8_kernels._w8a8_kernel.arg_names
    signature = {a: "constexpr" if a in constants else types.get(a, "i32") for a in names}
    src = ASTSource(int8_kernels._w8a8_kernel, signature,
                    constexprs={(names.index(a),): v for a, v in constants.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=t.num_warps, num_stages=t.num_stages))


def compile_gluon_gemm(name: str, epilogue: str, m: int = M):
    """``int8_gluon._w8a8_kernel`` with the runtime's epilogue for ``name``, as ``int8_gluon.w8a8_matmul``
    launches it."""
    import torch
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    from trident.models import int8_gluon

    n, k = SHAPES[name]
    f = flags(name, epilogue)
    block_m, block_n, block_k = int8_gluon.BLOCK

    def desc(rows, cols, block, dtype, gl_dtype):  # the descriptor's type as the launcher mangles it
        layout = gl.NVMMASharedLayout.get_default_for(block, gl_dtype)
        return mangle_type(TensorDescriptor.from_tensor(torch.empty(rows, cols, dtype=dtype), block, layout))
    quantized = f["QUANTIZE_OUT"]
    types = {"a_desc": desc(m, k, [block_m, block_k], torch.int8, gl.int8),
             "b_desc": desc(n, k, [block_n, block_k], torch.int8, gl.int8),
             "out_desc": desc(m, n, [block_m, block_n], torch.int8 if quantized else torch.float16,
                              gl.int8 if quantized else gl.float16),
             "xs_ptr": "*fp32", "ws_ptr": "*fp32", "b_ptr": "*fp16", "qs_ptr": "*fp32", "r_ptr": "*fp16",
             "rs_ptr": "*fp32", "rg_ptr": "*fp16", "rb_ptr": "*fp16"}
    constants = dict(HAS_X_SCALE=f["HAS_X_SCALE"], HAS_BIAS=f["HAS_BIAS"], GELU=f["GELU"] != "",
                     QUANTIZE_OUT=quantized, HAS_RESIDUAL=f["HAS_RESIDUAL"], NORM_RESIDUAL=f["NORM_RESIDUAL"],
                     HALF=f["HALF"], STAGES=int8_gluon.STAGES, GROUP_M=int8_gluon.GROUP_M)
    names = int8_gluon._w8a8_kernel.arg_names
    signature = {a: "constexpr" if a in constants else types.get(a, "i32") for a in names}
    src = GluonASTSource(int8_gluon._w8a8_kernel, signature,
                         constexprs={(names.index(a),): v for a, v in constants.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))


def opcodes(kernel) -> collections.Counter:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(NVDISASM), "-c", f.name], capture_output=True, text=True, check=True).stdout
    counts = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if m:
            counts[m.group(1)] += 1
    # wgmma waits by the number of groups they leave in flight: "mma_wait_0" only means the tensor cores
    # drain at every K step (Triton keeps no int32-accumulator wgmma in flight).
    for depth in re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x(\d+)", sass):
        counts[f"mma_wait_{int(depth, 16)}"] += 1
    return counts


def waits(counts: collections.Counter) -> str:
    """The wgmma waits as "groups left in flight:count" pairs, e.g. "0:1/1:1"."""
    return "/".join(f"{op[len('mma_wait_'):]}:{c}" for op, c in sorted(counts.items()) if op.startswith("mma_wait"))


def by_unit(counts: collections.Counter) -> dict[str, int]:
    units = {unit: sum(counts[op] for op in ops) for unit, ops in UNITS.items()}
    units["total"] = sum(c for op, c in counts.items() if not op.startswith("mma_wait"))
    return units


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, help="write the counts here")
    p.add_argument("--all-tiles", action="store_true",
                   help=f"also compile both epilogues at every tile shape the rule picks ({', '.join(map(str, ROWS))} rows)")
    args = p.parse_args(argv)
    rows = []
    print(f"W8A8 GEMM, sm_90, M = {M}: SASS instructions per program; epilogue rows are over the 'none' floor\n")
    print(f"| GEMM | epilogue | {' | '.join(list(UNITS) + ['total'])} | wgmma waits (groups left in flight: count) "
          "| top opcodes |")
    print("|---|---|" + "---:|" * (len(UNITS) + 1) + "---|---|")
    for name in SHAPES:
        floor = None
        for epilogue in ("none", "fp32", "f16x2"):
            counts = opcodes(compile_gemm(name, epilogue))
            units = by_unit(counts)
            shown = units if floor is None else {u: units[u] - floor[u] for u in units}
            floor = floor or units
            top = ", ".join(f"{op} {c}" for op, c in counts.most_common(6) if not op.startswith("mma_wait"))
            rows.append({"gemm": name, "epilogue": epilogue, "units": units, "over_floor": shown,
                         "opcodes": dict(counts)})
            sign = "" if epilogue == "none" else "+"
            print(f"| {name} | {epilogue} | " + " | ".join(f"{sign}{shown[u]}" for u in list(UNITS) + ["total"])
                  + f" | {waits(counts)} | {top} |", flush=True)
    gluon_rows = []
    print("\nint8_gluon (the runtime's opt-in kernel): wgmma waits and instructions per program\n")
    print("| GEMM | epilogue | wgmma waits (groups left in flight: count) | shared memory | total |")
    print("|---|---|---|---:|---:|")
    for name in SHAPES:
        for epilogue in ("fp32", "f16x2"):
            kernel = compile_gluon_gemm(name, epilogue)
            counts = opcodes(kernel)
            units = by_unit(counts)
            gluon_rows.append({"gemm": name, "epilogue": epilogue, "units": units, "opcodes": dict(counts),
                               "shared": kernel.metadata.shared})
            print(f"| {name} | {epilogue} | {waits(counts)} | {kernel.metadata.shared} | {units['total']} |", flush=True)
    compiled = compile_all_tiles() if args.all_tiles else []
    if args.json:
        args.json.write_text(json.dumps({"target": "sm_90", "M": M, "rows": rows, "gluon": gluon_rows,
                                         "all_tiles": compiled}, indent=1))
    return 1 if any(not c["ok"] for c in compiled) else 0


def compile_all_tiles() -> list[dict]:
    """Every (GEMM, tile shape, epilogue) the runtime can launch, compiled for sm_90: the inline PTX of the
    fp16-pair epilogue meets a different register layout in each tile shape."""
    results = []
    seen = set()
    for m, name, epilogue in itertools.product(ROWS, SHAPES, ("fp32", "f16x2")):
        key = (int8_kernels.w8a8_tiles(m, *SHAPES[name]), name, epilogue)
        if key in seen:
            continue
        seen.add(key)
        try:
            compile_gemm(name, epilogue, m)
            error = ""
        except Exception as e:  # noqa: BLE001 - a failed compile is the result
            error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        results.append({"rows": m, "gemm": name, "epilogue": epilogue, "tiles": repr(key[0]), "ok": not error,
                        "error": error})
        print(f"  {m:6d} rows {name:9s} {epilogue:6s} {'ok' if not error else 'FAILED ' + error}", flush=True)
    return results


if __name__ == "__main__":
    sys.exit(main())
