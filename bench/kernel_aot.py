"""Compile cdcompile's Triton kernels for NVIDIA GPUs (H100 first) on a machine without a GPU.

    python bench/kernel_aot.py                      # every GPU the kernels claim; on sm_90 + the tile sweep
    python bench/kernel_aot.py --quick --capability 90   # the launchers' shipped tiles only (the CPU test)
    python bench/kernel_aot.py --out bench/results/kernels_aot   # where the JSON + markdown go

The real launchers (``cdcompile.kernels.sage_attn`` and ``fp8_quant``) run on CPU tensors while
Triton's active driver is one that names a CUDA target and launches nothing. Triton then does what
it does at a first launch on the GPU: it specializes the arguments (16-byte alignment, sizes divisible
by 16, strides of 1), compiles through its NVIDIA backend to a cubin with the ptxas it bundles, and
refuses a kernel whose shared memory exceeds the device's (``DEVICES``). Per compiled kernel the
table gives registers per thread and spill bytes (``ptxas -v`` on the PTX), shared memory, and how
its ``tl.dot`` products were lowered: ``wgmma`` (Hopper's warp-group MMA), ``tcgen05`` (Blackwell's
tensor-memory MMA) or ``mma`` (the warp-level instruction of Ampere and Ada). The kernels need compute
capability 8.9 or newer (``_triton.MIN_CUDA_CAPABILITY``), so 8.9, 9.0, 10.0 and 12.0 are compiled.
Nothing runs and nothing is timed: speed and accuracy on the device are bench/kernel_bench.py's.

Needs TRITON_INTERPRET unset or 0 (the interpreter would compile nothing); exits 1 when a kernel
fails to compile or a shipped tile spills registers, 0 otherwise.
"""

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("bench/kernel_aot.py compiles kernels: run it with TRITON_INTERPRET unset or 0")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia import compiler as nv  # noqa: E402

from cdcompile.kernels import fp8_quant, sage_attn  # noqa: E402

# Shared memory one block may opt into per compute capability (CUDA programming guide, "Technical
# Specifications per Compute Capability"): 99 KiB on 8.9 and 12.0, 227 KiB on 9.0 and 10.0.
# Per SM: shared memory, resident warps and blocks (the same tables; every one has 64K registers).
DEVICES = {
    89: dict(name="Ada (L4, L40S, RTX 4090)", max_shared_mem=101376, sm_shared=102400, sm_warps=48, sm_blocks=24),
    90: dict(name="Hopper (H100, H200)", max_shared_mem=232448, sm_shared=233472, sm_warps=64, sm_blocks=32),
    100: dict(name="Blackwell (B200)", max_shared_mem=232448, sm_shared=233472, sm_warps=64, sm_blocks=32),
    120: dict(name="Blackwell (RTX 5090)", max_shared_mem=101376, sm_shared=102400, sm_warps=48, sm_blocks=24),
}


def resident_warps(capability: int, registers: int, shared: int, num_warps: int) -> int:
    """Warps of one kernel resident on an SM at once, by the CUDA occupancy rules: registers are
    allocated per warp in units of 256 (8 per thread), shared memory per block plus 1 KiB the system
    reserves. A model of the hardware limits, not a measurement."""
    dev = DEVICES[capability]
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = (65536 // per_warp) // num_warps if per_warp else dev["sm_blocks"]
    by_shared = dev["sm_shared"] // (shared + 1024)
    blocks = min(by_regs, by_shared, dev["sm_warps"] // num_warps, dev["sm_blocks"])
    return blocks * num_warps

KERNELS = {f.fn.__name__: f for f in (sage_attn._quantize_int8_kernel, sage_attn._quantize_v_kernel,
                                       sage_attn._sage_attention_kernel, fp8_quant._quantize_pack_kernel,
                                       fp8_quant._dequantize_unpack_kernel)}


class DryRunDriver:
    """The part of Triton's driver interface that compiling and launching use: a fixed CUDA target,
    a device number (``run`` gives each target its own, so Triton keeps a kernel cache per target),
    stream 0, and a launcher that does nothing. Set with ``triton.runtime.driver.set_active``."""

    def __init__(self, capability: int, max_shared_mem: int, max_threads: int = 1024, multiprocessor_count: int = 132,
                 device: int = 0):
        self.target = GPUTarget("cuda", capability, 32)
        self.device = device
        self.utils = self._Utils(max_shared_mem, max_threads, multiprocessor_count)

    class _Utils:
        def __init__(self, max_shared_mem, max_threads, multiprocessor_count):
            self.props = dict(max_shared_mem=max_shared_mem, max_num_regs=65536, warpSize=32,
                              multiprocessor_count=multiprocessor_count, max_threads=max_threads)

        def get_device_properties(self, device):
            return dict(self.props)

        def load_binary(self, name, kernel, shared, device):  # module, function, regs, spills, max threads
            return None, None, 0, 0, self.props["max_threads"]

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def launcher_cls(self, src, metadata):
        return lambda *args, **kwargs: None


def compiled() -> dict[int, tuple[str, object]]:
    """Every kernel compiled so far, by id: (kernel name, CompiledKernel)."""
    out = {}
    for name, fn in KERNELS.items():
        for cache in fn.device_caches.values():
            for k in cache[0].values():
                out[id(k)] = (name, k)
    return out


def ptxas_usage(ptx: str, capability: int) -> dict:
    """Registers and spill bytes per thread, from ``ptxas -v`` on the kernel's PTX (Triton's own ptxas)."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        arch = nv.sm_arch_from_capability(capability)
        r = subprocess.run([nv.get_ptxas(capability).path, "-v", f"--gpu-name={arch}", src, "-o",
                            os.path.join(d, "k.cubin")], capture_output=True, text=True)
    log = r.stdout + r.stderr
    if r.returncode:
        raise RuntimeError(f"ptxas failed: {log[-400:]}")

    def num(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return dict(registers=num(r"Used (\d+) registers"), spill_store_bytes=num(r"(\d+) bytes spill stores"),
                spill_load_bytes=num(r"(\d+) bytes spill loads"))


def describe(name: str, k, capability: int) -> dict:
    fn = KERNELS[name]
    consts = {}
    for key, v in getattr(k.src, "constants", {}).items():
        idx = key[0] if isinstance(key, tuple) else key
        arg = fn.arg_names[idx] if isinstance(idx, int) else str(idx)
        if arg.isupper():  # the tl.constexpr parameters; lower-case ones are specialized arguments (== 1)
            consts[arg] = str(v) if not isinstance(v, (bool, int, float)) else v
    ttgir = k.asm["ttgir"]
    md = k.metadata
    # dot ops left in the final TTGIR (a pipelined loop may hold a product more than once)
    dots = {kind: len(re.findall(pattern, ttgir)) for kind, pattern in DOT_KINDS.items()}
    usage = ptxas_usage(k.asm["ptx"], capability)
    return dict(capability=capability, kernel=name, constexprs=consts, num_warps=md.num_warps,
                num_stages=md.num_stages, shared_bytes=md.shared, dots={k: v for k, v in dots.items() if v},
                resident_warps=resident_warps(capability, usage["registers"], md.shared, md.num_warps), **usage)


DOT_KINDS = {"wgmma": r"ttng\.warp_group_dot ", "tcgen05": r"ttng\.tc_gen5_mma ", "mma": r"= tt\.dot "}


def launches(quick: bool, sweep: bool):
    """(label, shipped, thunk) for every launch to compile: the launchers with their own tiles
    (shipped=True), then, with ``sweep``, the attention tiles bench/kernel_bench.py --sweep times."""
    g = torch.Generator().manual_seed(0)

    def qkv(s, d, dtype, heads=24):
        return [torch.randn(1, heads, s, d, generator=g).to(dtype) for _ in range(3)]

    shapes = ([(4608, 128, torch.bfloat16, False), (1000, 64, torch.float16, True)] if quick else
              [(4608, 128, torch.bfloat16, False), (4097, 128, torch.float16, True),
               (1000, 64, torch.bfloat16, False), (77, 32, torch.float32, False)])
    for s, d, dtype, causal in shapes:
        q, k, v = qkv(s, d, dtype)
        yield (f"sage_attention S={s} D={d} {str(dtype)[6:]}{' causal' if causal else ''}", True,
               lambda q=q, k=k, v=v, c=causal: sage_attn._sage_attention_triton(q, k, v, None, c))
    for s, d, additive in [(4608, 128, False), (1000, 64, True)] if not quick else [(4608, 128, False)]:
        q, k, v = qkv(s, d, torch.bfloat16)
        # text padding as joint attention passes it: (b, 1, 1, n) bool, or a bias over (b, h, m, n)
        mask = torch.arange(s)[None, None, None, :] < s - 77
        if additive:
            mask = torch.zeros(1, 24, s, s, dtype=torch.bfloat16).masked_fill(~mask, float("-inf"))
        yield (f"sage_attention S={s} D={d} bfloat16, {'additive' if additive else 'bool'} attn_mask", True,
               lambda q=q, k=k, v=v, mask=mask: sage_attn._sage_attention_triton(q, k, v, None, False,
                                                                                 attn_mask=mask))
    q, k, v = qkv(1024, 128, torch.bfloat16)
    yield ("sage_attention per-block QK scales, S=1024 D=128", True,
           lambda: sage_attn._sage_attention_triton(q, k, v, None, False, qk_per_token=False))
    splits = (("heads", torch.bfloat16, 128, 8), ("seq", torch.bfloat16, 128, 8))
    if not quick:
        splits += (("heads", torch.float32, 64, 3), ("seq", torch.float16, 96, 3))
    for split, dtype, d, world in splits:
        x = torch.randn(1, 4608 // world if split == "heads" else 4608, 24, d, generator=g).to(dtype)

        def quant(x=x, split=split, world=world):
            b, s, h, _ = x.shape
            vals, scales = fp8_quant._quantize_triton(x, world, split)
            other = "seq" if split == "heads" else "heads"
            # the packed buffer read back as the exchange delivers it (same bytes, other split)
            n = s * world if split == "heads" else s
            heads = -(-h // world) if split == "heads" else h
            fp8_quant._dequantize_triton(vals, scales, b, n if other == "seq" else s, heads, world, other, x.dtype)

        yield f"fp8 all-to-all quantize + dequantize, split={split} D={d} {str(dtype)[6:]} W={world}", True, quant
    if not sweep:
        return
    from kernel_bench import SWEEP_CONFIGS

    q, k, v = qkv(4608, 128, torch.bfloat16)
    for i, (bm, bn, warps, stages) in enumerate(SWEEP_CONFIGS):
        for rounding in (False, True) if i == 0 else (False,):
            def attend(bm=bm, bn=bn, warps=warps, stages=stages, rounding=rounding):
                quantized = sage_attn._quantize_qkv(q, k, v, None, bm, bn, True)
                sage_attn._attend(quantized, q.dtype, False, bm, bn, warps, stages, rounding)

            yield (f"sweep S=4608 D=128: BLOCK_M={bm} BLOCK_N={bn} warps={warps} stages={stages}"
                   f"{' fp32 rounding' if rounding else ''}", False, attend)


def run(capabilities: list[int], quick: bool) -> list[dict]:
    """Compile every launch for each capability; sm_90 also gets the tile sweep unless ``quick``."""
    from triton.runtime import driver

    rows, seen = [], set(compiled())
    try:
        for cap in capabilities:
            # the dry-run device's number is its capability, so Triton keeps a kernel cache per target
            driver.set_active(DryRunDriver(cap, DEVICES[cap]["max_shared_mem"], device=cap))
            for label, shipped, thunk in launches(quick, sweep=cap == 90 and not quick):
                t0 = time.perf_counter()
                try:
                    thunk()
                    error = None
                except Exception as e:  # a compile error or OutOfResources: reported, the others go on
                    error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                now = compiled()
                new = [now[i] for i in now if i not in seen]
                seen.update(now)
                secs = time.perf_counter() - t0
                if error:
                    rows.append(dict(capability=cap, launch=label, shipped=shipped, error=error, seconds=secs))
                for name, k in new:
                    rows.append(dict(launch=label, shipped=shipped, seconds=secs, **describe(name, k, cap)))
                print(f"{secs:5.1f} s  sm_{cap} {label}: {len(new)} kernel(s) compiled"
                      f"{'; ' + error if error else ''}", flush=True)
    finally:
        try:
            driver.reset_active()
        except RuntimeError:  # no GPU driver here to go back to; the process ends after the report
            pass
    return rows


def problems(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if "error" in r:
            out.append(f"sm_{r['capability']} {r['launch']}: {r['error']}")
        elif r["shipped"] and (r["spill_store_bytes"] or r["spill_load_bytes"]):
            out.append(f"sm_{r['capability']} {r['launch']}: {r['kernel']} spills {r['spill_store_bytes']} bytes "
                       f"per thread")
    return out


def to_markdown(meta: dict, rows: list[dict]) -> str:
    caps = sorted({r["capability"] for r in rows})
    lines = [
        "# cdcompile Triton kernels compiled for NVIDIA GPUs without a GPU (bench/kernel_aot.py)",
        "",
        f"{meta['date']}; triton {meta['triton']}, torch {meta['torch']}; commit `{meta['git_commit'][:12]}`"
        f"{' + uncommitted changes' if meta['git_dirty'] else ''}. Targets: "
        + "; ".join(f"sm_{c} {DEVICES[c]['name']}, {DEVICES[c]['max_shared_mem'] // 1024} KiB shared memory per block"
                    for c in caps) + ".",
        "",
        "Each launch ran the real launcher on CPU tensors with Triton's driver replaced by one that compiles "
        "for the target and launches nothing (see the script's docstring). Registers and spills per thread "
        "from `ptxas -v`; dots: the MMA ops each kernel's `tl.dot` products became (wgmma: Hopper's warp-group "
        "MMA; tcgen05: Blackwell's; mma: the warp-level one; a software-pipelined loop may hold one product "
        "more than once). Warps/SM: warps of the kernel resident on one SM at once, computed from its registers "
        "and shared memory by the CUDA occupancy rules (a model, not a measurement). Seconds include the "
        "launcher's CPU work. Nothing was run or timed on a GPU.",
        "",
        "| target | launch | kernel | constexprs | warps | stages | registers | spill bytes (st/ld) | shared KiB "
        "| warps/SM | dots | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cap = f"sm_{r['capability']}"
        if "error" in r:
            lines.append(f"| {cap} | {r['launch']} | **failed** | {r['error']} |  |  |  |  |  |  |  | "
                         f"{r['seconds']:.1f} |")
            continue
        consts = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        dots = ", ".join(f"{n} {kind}" for kind, n in r["dots"].items()) or "-"
        lines.append(f"| {cap} | {r['launch']}{'' if r['shipped'] else ' (sweep)'} | `{r['kernel']}` | {consts} | "
                     f"{r['num_warps']} | {r['num_stages']} | {r['registers']} | {r['spill_store_bytes']}/"
                     f"{r['spill_load_bytes']} | {r['shared_bytes'] / 1024:.1f} | {r['resident_warps']} | {dots} | "
                     f"{r['seconds']:.1f} |")
    bad = problems(rows)
    lines += ["", f"**Problems: {len(bad)}**" + ("".join(f"\n- {b}" for b in bad) if bad else
                                                 " (every kernel compiled; no shipped tile spills)"), ""]
    return "\n".join(lines)


def metadata() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                triton=triton.__version__, torch=torch.__version__, git_commit=git("rev-parse", "HEAD") or "unknown",
                git_dirty=bool(git("status", "--porcelain", "--untracked-files=no")), devices=DEVICES)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--capability", type=int, nargs="+", default=sorted(DEVICES), choices=sorted(DEVICES),
                   help="compute capabilities to compile for (89 Ada, 90 Hopper, 100 and 120 Blackwell)")
    p.add_argument("--quick", action="store_true", help="the launchers' shipped tiles only (no sweep)")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md (default: bench/results/kernels_aot; "
                                               "nothing with --quick or --json)")
    p.add_argument("--json", default=None, help="write the rows as JSON here (and nothing else)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = run(args.capability, args.quick)
    meta = metadata()
    table = to_markdown(meta, rows)
    print(table)
    out = args.out or (None if args.quick or args.json else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", "kernels_aot"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    if out:
        with open(out + ".json", "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        with open(out + ".md", "w") as f:
            f.write(table)
    return 1 if problems(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
