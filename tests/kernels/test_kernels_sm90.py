"""The Triton kernels compile for an H100 (sm_90a) on this CPU machine: ``bench/kernel_aot.py --quick``.

The interpreter tests check what the kernels compute; they never run Triton's GPU compiler, so a
kernel could pass them all and still fail to compile, spill registers or exceed shared memory on the
GPU. Here every launcher runs with the shipped tiles while Triton's driver is one that compiles for
sm_90a and launches nothing (see bench/kernel_aot.py). It runs in a subprocess because this test
session imported the kernels under TRITON_INTERPRET=1.
"""

import json
import os
import subprocess
import sys

import pytest

from cdcompile.kernels import fp8_quant, sage_attn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "kernel_aot.py"), "--quick", "--json",
                        str(d / "aot.json")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(d / "aot.json") as f:
        return json.load(f)["rows"]


def test_every_kernel_compiles_for_sm90_without_spills(compiled):
    assert not [r for r in compiled if "error" in r]
    assert {r["kernel"] for r in compiled} == KERNELS
    for r in compiled:
        assert r["spill_store_bytes"] == r["spill_load_bytes"] == 0, r
        assert 0 < r["registers"] <= 255, r
        assert r["shared_bytes"] <= 232448, r  # H100: 227 KiB per block


def test_attention_dots_are_hopper_warp_group_mmas(compiled):
    """Both products (INT8 Q.K^T and FP8 P.V) must lower to wgmma; the older mma would run at a
    fraction of Hopper's tensor-core rate."""
    rows = [r for r in compiled if r["kernel"] == "_sage_attention_kernel"]
    assert len(rows) >= 2  # head dims 128 and 64 at least
    assert {r["constexprs"]["HEAD_D"] for r in rows} >= {64, 128}
    for r in rows:
        assert (r["wgmma"], r["mma"]) == (2, 0), r
        assert (r["num_warps"], r["num_stages"]) == (sage_attn.NUM_WARPS, sage_attn.NUM_STAGES)
        assert (r["constexprs"]["BLOCK_M"], r["constexprs"]["BLOCK_N"]) == (sage_attn.BLOCK_M, sage_attn.BLOCK_N)


def test_quantization_kernels_compile_for_both_splits(compiled):
    splits = {r["constexprs"]["SPLIT_SEQ"] for r in compiled if r["kernel"] in ("_quantize_pack_kernel",
                                                                                 "_dequantize_unpack_kernel")}
    assert splits == {True, False}
    assert set(fp8_quant.SPLITS) == {"heads", "seq"}


def test_the_sweep_starts_from_the_shipped_tiles():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        from kernel_bench import SWEEP_CONFIGS
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    assert SWEEP_CONFIGS[0] == (sage_attn.BLOCK_M, sage_attn.BLOCK_N, sage_attn.NUM_WARPS, sage_attn.NUM_STAGES)
