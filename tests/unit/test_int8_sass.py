"""The W8A8 GEMM's machine code, checked on a machine without a GPU: ``loadtest/sass_int8_gemm.py``
compiles the kernel for sm_90 (H100/H200) with the ptxas that ships in the triton wheel.

What the interpreter cannot check: that the fp16-pair epilogue's inline PTX assembles in the register
layout of every tile shape the runtime launches, that it keeps the FMA-pipe work it was written to
remove off that pipe, and that ``int8_gluon``'s kernel (Gluon does not run in the interpreter) compiles
and keeps a wgmma group in flight where Triton's int8 kernels drain the tensor cores."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def test_every_launchable_kernel_compiles_for_sm90_and_the_fp16_pair_epilogue_and_gluon_do_what_they_are_for(tmp_path):
    out = tmp_path / "sass.json"
    run = subprocess.run([sys.executable, "loadtest/sass_int8_gemm.py", "--all-tiles", "--json", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    compiled = result["all_tiles"]
    assert {c["epilogue"] for c in compiled} == {"fp32", "f16x2"} and len({c["tiles"] for c in compiled}) >= 5
    assert all(c["ok"] for c in compiled), [c for c in compiled if not c["ok"]]
    fma = {(r["gemm"], r["epilogue"]): r["over_floor"]["fma"] for r in result["rows"] if r["epilogue"] != "none"}
    for gemm in ("up", "attn_out", "down"):  # GELU + int8 rounding; the LayerNorm'd residual
        assert fma[(gemm, "f16x2")] < 0.6 * fma[(gemm, "fp32")], fma
    assert fma[("qkv", "f16x2")] == fma[("qkv", "fp32")]  # scales and bias only: the same code either way
    # Triton drains the tensor cores at every K step of an int32-accumulator GEMM; int8_gluon exists to keep
    # one wgmma group in flight there instead.
    assert all(r["opcodes"].get("mma_wait_0") and not r["opcodes"].get("mma_wait_1") for r in result["rows"])
    assert {(r["gemm"], r["epilogue"]) for r in result["gluon"]} == {(g, e) for g in ("qkv", "attn_out", "up", "down")
                                                                      for e in ("fp32", "f16x2")}
    assert all(r["opcodes"].get("mma_wait_1") == 1 for r in result["gluon"])
