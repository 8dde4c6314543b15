"""The Triton kernels compile for every GPU they claim (compute capability 8.9 and newer), on this CPU
machine: ``bench/kernel_aot.py --quick``.

The interpreter tests check what the kernels compute; they never run Triton's GPU compiler, so a
kernel could pass them all and still fail to compile, spill registers or exceed shared memory on the
GPU. Here every launcher runs with the shipped tiles while Triton's driver is one that compiles for
the target and launches nothing (see bench/kernel_aot.py). It runs in a subprocess because this test
session imported the kernels under TRITON_INTERPRET=1.
"""

import json
import os
import subprocess
import sys

import pytest

from cdcompile.kernels import fp8_quant, sage_attn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CAPABILITIES = (89, 90, 100, 120)  # Ada, Hopper, Blackwell (B200), Blackwell (RTX 5090)
SHARED_MEMORY = {89: 101376, 90: 232448, 100: 232448, 120: 101376}  # bytes one block may use
KERNELS = {"_quantize_int8_kernel", "_quantize_v_kernel", "_sage_attention_kernel", "_quantize_pack_kernel",
           "_dequantize_unpack_kernel"}


def _ptxas_missing() -> str:
    try:
        from triton.backends.nvidia import compiler as nv

        path = nv.get_ptxas(90).path
    except Exception as e:  # no Triton, or a Triton without its NVIDIA backend
        return f"Triton's NVIDIA backend is not importable: {e}"
    return "" if path and os.path.exists(path) else f"Triton's ptxas is missing ({path})"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    why = _ptxas_missing()
    if why:
        pytest.skip(why)
    d = tmp_path_factory.mktemp("aot")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(d / "cache")}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "kernel_aot.py"), "--quick", "--capability",
                        *map(str, CAPABILITIES), "--json", str(d / "aot.json")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(d / "aot.json") as f:
        return json.load(f)["rows"]


def test_every_kernel_compiles_for_every_claimed_gpu_without_spills(compiled):
    assert not [r for r in compiled if "error" in r]
    for cap in CAPABILITIES:
        assert {r["kernel"] for r in compiled if r["capability"] == cap} == KERNELS, cap
    for r in compiled:
        assert r["spill_store_bytes"] == r["spill_load_bytes"] == 0, r
        assert 0 < r["registers"] <= 255, r
        assert r["shared_bytes"] <= SHARED_MEMORY[r["capability"]], r


def test_attention_dots_use_each_gpus_tensor_core_instruction(compiled):
    """On Hopper both products (INT8 Q.K^T, FP8 P.V) must be warp-group MMAs (the warp-level mma
    runs at a fraction of Hopper's tensor-core rate); Blackwell's FP8 product its tcgen05 MMA (Triton
    3.6 keeps the INT8 one on mma there, 3.9 does not); Ada and RTX 50xx have only mma."""
    rows = [r for r in compiled if r["kernel"] == "_sage_attention_kernel"]
    for cap in CAPABILITIES:
        mine = [r for r in rows if r["capability"] == cap]
        assert {r["constexprs"]["HEAD_D"] for r in mine} >= {64, 128}, cap
        assert {r["constexprs"]["MASK"] for r in mine} >= {0, 1}, cap  # without and with a bool attn_mask
    for r in rows:
        assert (r["num_warps"], r["num_stages"]) == (sage_attn.NUM_WARPS, sage_attn.NUM_STAGES)
        assert (r["constexprs"]["BLOCK_M"], r["constexprs"]["BLOCK_N"]) == (sage_attn.BLOCK_M, sage_attn.BLOCK_N)
        if r["capability"] == 90:
            assert r["dots"] == {"wgmma": 2}, r
        elif r["capability"] == 100:
            assert "tcgen05" in r["dots"] and "wgmma" not in r["dots"], r
        else:
            assert r["dots"] == {"mma": 2}, r


def test_quantization_kernels_compile_for_both_splits(compiled):
    splits = {r["constexprs"]["SPLIT_SEQ"] for r in compiled if r["kernel"] in ("_quantize_pack_kernel",
                                                                                 "_dequantize_unpack_kernel")}
    assert splits == {True, False}
    assert set(fp8_quant.SPLITS) == {"heads", "seq"}


def test_the_sweep_starts_from_the_shipped_tiles():
    # loaded from its file under a private name: neither sys.path nor sys.modules learn "kernel_bench"
    # (tests/test_bench_names.py checks that no bench script name is importable)
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bench_kernel_bench", os.path.join(ROOT, "bench", "kernel_bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.SWEEP_CONFIGS[0] == (sage_attn.BLOCK_M, sage_attn.BLOCK_N, sage_attn.NUM_WARPS, sage_attn.NUM_STAGES)
