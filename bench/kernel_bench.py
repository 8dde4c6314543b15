"""GPU microbenchmark of cdcompile's Triton kernels: Sage-style attention and FP8 all-to-all quantization.

    python bench/kernel_bench.py                                   # B=1, H=24, D=128, S in 1024 4096 4608 16384
    python bench/kernel_bench.py --seq-lens 4096 --causal --outliers
    python bench/kernel_bench.py --out bench/results               # where the JSON + markdown go (default)
    python bench/kernel_bench.py --sweep 4608                      # + the attention kernel per tile config

Attention, per sequence length S (q, k, v of shape (B, H, S, D), bf16): median time of
``triton.testing.do_bench`` after its warm-up, for SDPA with the flash backend, SDPA with the cuDNN
backend, ``cdcompile.kernels.sage_attention`` end to end (quantization included), its attention kernel
alone, its quantization step alone (Q, K to INT8, V to FP8; the rest of "total" is the kernel), and
the per-block-QK variant. At --mask-seq-lens (default 4608) the same with a key-padding mask, bool
(B, 1, 1, S) with the last eighth of the keys masked as text padding leaves them: SDPA's efficient
and cuDNN backends (flash takes no mask) and ``sage_attention`` with the mask. Throughput counts
4*B*H*S*S*D flops (half that with --causal) and is put against the bf16 peak measured here with a
large bf16 matmul (not a datasheet figure). Accuracy: cosine and SNR against fp32 SDPA on the same inputs.

Quantization, per S: ``quantize_fp8_a2a`` of x (B, S, H, D) bf16 for --world-size ranks (split
"heads") and ``dequantize_fp8_a2a`` of the result, in GB/s (bytes read + written) and as a share of
the copy bandwidth measured here with a large device-to-device copy; the torch reference is timed
alongside as the baseline.

Every run prints one markdown table and writes ``kernels-<date>-<device>.json`` and ``.md`` with the
device, torch/triton versions, git commit and date. Needs a CUDA GPU and compiled Triton: it exits
with a message on a machine without one, and refuses to run under TRITON_INTERPRET=1.
"""

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DEFAULT_SEQ_LENS = (1024, 4096, 4608, 16384)
# where the timed inputs live; tests/kernels/test_kernel_bench.py runs the bench's code paths on the
# CPU under the Triton interpreter (with a stub timer) so that a GPU run does not find their bugs
DEVICE = "cuda"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128, choices=(32, 64, 128))
    p.add_argument("--seq-lens", type=int, nargs="+", default=list(DEFAULT_SEQ_LENS))
    p.add_argument("--causal", action="store_true", help="causal attention (flops counted as half)")
    p.add_argument("--outliers", action="store_true", help="outlier channels in Q, K and a token-mean in K")
    p.add_argument(
        "--mask-seq-lens", type=int, nargs="*", default=[4608],
        help="lengths at which attention is also timed with a key-padding mask (none: skip)",
    )
    p.add_argument("--world-size", type=int, default=8, help="ranks of the quantized all-to-all")
    p.add_argument("--warmup-ms", type=int, default=100, help="do_bench warm-up budget")
    p.add_argument("--rep-ms", type=int, default=500, help="do_bench measuring budget (median reported)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument(
        "--sweep", type=int, nargs="*", metavar="S", default=None,
        help="also time the attention kernel alone over tile/warp/stage configurations at these lengths "
        "(no value: 4608), with the hardware and the fp32-arithmetic rounding of P",
    )
    p.add_argument("--skip-attention", action="store_true")
    p.add_argument("--skip-quant", action="store_true")
    args = p.parse_args(argv)
    if args.sweep is not None and not args.sweep:
        args.sweep = [4608]
    if min(args.seq_lens + args.mask_seq_lens) < 1 or args.batch < 1 or args.heads < 1 or args.world_size < 1:
        p.error("--seq-lens, --batch, --heads and --world-size must be positive")
    return args


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench/kernel_bench.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
            f"(torch {torch.__version__}). The CPU tests in tests/kernels check correctness; speed needs a GPU."
        )
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("bench/kernel_bench.py times compiled kernels: unset TRITON_INTERPRET (it is 1)")


def git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
        return out.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def median_ms(fn, args) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median"))


def measure_bf16_peak_tflops(args) -> float:
    """Dense bf16 matmul 8192^3: the practical tensor-core peak of this GPU, measured, not quoted."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / (median_ms(lambda: a @ b, args) * 1e-3) / 1e12


def measure_copy_gbps(args) -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (median_ms(lambda: dst.copy_(src), args) * 1e-3) / 1e9


def cosine_snr(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    o, r = out.double().flatten(), ref.double().flatten()
    noise = float((o - r) @ (o - r))
    snr = math.inf if noise == 0 else 10 * math.log10(float(r @ r) / noise)
    return float(o @ r / (o.norm() * r.norm())), snr


def attention_inputs(args, s):
    g = torch.Generator(device=DEVICE).manual_seed(s)
    shape = (args.batch, args.heads, s, args.head_dim)
    q, k, v = (torch.randn(shape, device=DEVICE, generator=g) for _ in range(3))
    if args.outliers:
        channels = torch.randperm(args.head_dim, device=DEVICE, generator=g)[:4]
        q[..., channels] *= 5.0
        k[..., channels] *= 5.0
        k += 2.0 * torch.randn(args.batch, args.heads, 1, args.head_dim, device=DEVICE, generator=g)
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def bench_attention(args, peak_tflops) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from cdcompile.kernels import sage_attention
    from cdcompile.kernels import sage_attn

    rows = []
    for s in sorted(set(args.seq_lens) | set(args.mask_seq_lens)):
        q, k, v = attention_inputs(args, s)
        truth = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=args.causal)
        flops = 4 * args.batch * args.heads * s * s * args.head_dim * (0.5 if args.causal else 1.0)

        def sdpa_with(backend, mask=None):
            def run():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=args.causal)

            return run

        bm, bn = sage_attn.BLOCK_M, sage_attn.BLOCK_N
        quantized = sage_attn._quantize_qkv(q, k, v, None, bm, bn, True)
        impls, masked_truth = {}, None
        if s in args.seq_lens:
            impls = {
                "sdpa flash (bf16)": sdpa_with(SDPBackend.FLASH_ATTENTION),
                "sdpa cudnn (bf16)": sdpa_with(SDPBackend.CUDNN_ATTENTION),
                "sage (total)": lambda: sage_attention(q, k, v, is_causal=args.causal, backend="triton"),
                "sage kernel only": lambda: sage_attn._attend(quantized, q.dtype, args.causal, bm, bn),
                "sage quantization only": lambda: sage_attn._quantize_qkv(q, k, v, None, bm, bn, True),
                "sage per-block QK (total)": lambda: sage_attn._sage_attention_triton(
                    q, k, v, None, args.causal, bm, bn, qk_per_token=False
                ),
            }
        if s in args.mask_seq_lens and not args.causal:  # SDPA takes a mask or is_causal, not both
            mask = padding_mask(args, s)
            masked_truth = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
            impls.update({
                "sdpa efficient (bf16, mask)": sdpa_with(SDPBackend.EFFICIENT_ATTENTION, mask),
                "sdpa cudnn (bf16, mask)": sdpa_with(SDPBackend.CUDNN_ATTENTION, mask),
                "sage (total, mask)": lambda: sage_attention(q, k, v, mask, backend="triton"),
            })
        flash_ms = None
        for name, fn in impls.items():
            row = {"seq_len": s, "impl": name}
            try:
                out = fn()
                ms = median_ms(fn, args)
            except RuntimeError as exc:  # e.g. no cuDNN attention for this GPU / build
                row.update(error=str(exc).splitlines()[0][:200])
                rows.append(row)
                continue
            if name.startswith("sdpa flash"):
                flash_ms = ms
            row.update(ms=ms, speedup_vs_flash=(flash_ms / ms) if flash_ms else None)
            if "quantization" not in name:  # its outputs are the quantized operands, not attention
                tflops = flops / (ms * 1e-3) / 1e12
                cos, snr = cosine_snr(out, masked_truth if "mask" in name else truth)
                row.update(tflops=tflops, pct_bf16_peak=100 * tflops / peak_tflops, cosine=cos, snr_db=snr)
            rows.append(row)
        del q, k, v, truth, masked_truth, quantized
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows


def padding_mask(args, s):
    """Key padding as a text encoder's mask leaves it: (B, 1, 1, S) bool, the last eighth of keys False."""
    mask = torch.ones(args.batch, 1, 1, s, dtype=torch.bool, device=DEVICE)
    mask[..., s - s // 8:] = False
    return mask


# (BLOCK_M, BLOCK_N, num_warps, num_stages) for --sweep; the first is the launchers' default. Each
# compiles for sm_90a without spilling (bench/kernel_aot.py; 128 x 64 with 4 warps spilled, so it is
# not here: BLOCK_M = 64 takes 4 warps, one warp group, instead).
SWEEP_CONFIGS = (
    (128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (64, 64, 4, 4),
    (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 8, 4),
)


def bench_sweep(args, peak_tflops) -> list[dict]:
    """The attention kernel alone (quantization excluded) per configuration: which tiles to ship.

    BLOCK_M and BLOCK_N also set the online-softmax tiles, so accuracy is reported per row too;
    ``fp32 rounding`` rows time the interpreter's exact rounding of P on the GPU, to show what the
    hardware cast saves.
    """
    from cdcompile.kernels import sage_attn

    rows = []
    for s in args.sweep:
        q, k, v = attention_inputs(args, s)
        truth = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=args.causal)
        flops = 4 * args.batch * args.heads * s * s * args.head_dim * (0.5 if args.causal else 1.0)
        for i, (bm, bn, warps, stages) in enumerate(SWEEP_CONFIGS):
            quantized = sage_attn._quantize_qkv(q, k, v, None, bm, bn, True)
            for fp32_rounding in (False, True) if i == 0 else (False,):
                row = dict(seq_len=s, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages,
                           fp32_rounding=fp32_rounding)

                def fn():
                    return sage_attn._attend(quantized, q.dtype, args.causal, bm, bn, warps, stages, fp32_rounding)

                try:
                    out = fn()
                    ms = median_ms(fn, args)
                except Exception as exc:  # a configuration this GPU or Triton cannot compile or launch
                    row.update(error=f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}")
                    rows.append(row)
                    continue
                cos, snr = cosine_snr(out, truth)
                tflops = flops / (ms * 1e-3) / 1e12
                row.update(ms=ms, tflops=tflops, pct_bf16_peak=100 * tflops / peak_tflops, cosine=cos, snr_db=snr)
                rows.append(row)
            del quantized
        del q, k, v, truth
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_quant(args, copy_gbps) -> list[dict]:
    from cdcompile.kernels import a2a_split_rows, dequantize_fp8_a2a, quantize_fp8_a2a

    rows = []
    w, h, d, b = args.world_size, args.heads, args.head_dim, args.batch
    for s in args.seq_lens:
        x = torch.randn(b, s, h, d, device=DEVICE, dtype=torch.bfloat16)
        values, scales = quantize_fp8_a2a(x, world_size=w, split="heads", backend="triton")
        # dequantize as the receiving rank would: the rows of all ranks for one head chunk
        hc = -(-h // w)
        rows_per_rank = a2a_split_rows(b, s, hc, w, "seq")
        recv_v, recv_s = values[: sum(rows_per_rank)], scales[: sum(rows_per_rank)]
        cases = {
            "quantize+pack": (
                lambda backend: quantize_fp8_a2a(x, world_size=w, split="heads", backend=backend),
                x.numel() * x.element_size() + values.numel() + 4 * scales.numel(),
            ),
            "dequantize+unpack": (
                lambda backend: dequantize_fp8_a2a(
                    recv_v, recv_s, batch=b, seq_len=s, num_heads=hc, world_size=w, split="seq", backend=backend
                ),
                recv_v.numel() + 4 * recv_s.numel() + 2 * b * s * hc * d,
            ),
        }
        for name, (fn, nbytes) in cases.items():
            ms = median_ms(lambda: fn("triton"), args)
            ref_ms = median_ms(lambda: fn("torch"), args)
            gbps = nbytes / (ms * 1e-3) / 1e9
            rows.append(
                dict(
                    seq_len=s, op=name, bytes=nbytes, ms=ms, gbps=gbps, pct_copy_bw=100 * gbps / copy_gbps,
                    torch_ref_ms=ref_ms, speedup_vs_ref=ref_ms / ms,
                )
            )
    return rows


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def to_markdown(meta, attention, quant, sweep=()) -> str:
    lines = [
        f"# cdcompile kernels on {meta['device']} ({meta['date']})",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}; "
        f"B={meta['batch']} H={meta['heads']} D={meta['head_dim']} causal={meta['causal']} "
        f"outliers={meta['outliers']}; measured bf16 matmul peak {meta['bf16_peak_tflops']:.0f} TFLOP/s, "
        f"copy bandwidth {meta['copy_gbps']:.0f} GB/s; times are do_bench medians.",
        "",
    ]
    if attention:
        if any("mask" in r["impl"] for r in attention):
            lines += [
                "Rows marked mask: a key-padding mask, bool (B, 1, 1, S) with the last eighth of the keys "
                "masked, against fp32 SDPA with the same mask; their flops count every key. x flash: "
                "against unmasked flash at the same S. The quantization row (Q, K to INT8, V to FP8) is "
                "part of sage (total).",
                "",
            ]
        lines += [
            "| S | implementation | ms | TFLOP/s | % bf16 peak | x flash | cosine | SNR dB |",
            "|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in attention:
            if "error" in r:
                lines.append(f"| {r['seq_len']} | {r['impl']} | unavailable: {r['error']} | | | | | |")
                continue
            lines.append(
                f"| {r['seq_len']} | {r['impl']} | {r['ms']:.3f} | {_fmt(r.get('tflops'), '.0f')} | "
                f"{_fmt(r.get('pct_bf16_peak'), '.0f')} | {_fmt(r['speedup_vs_flash'], '.2f')} | "
                f"{_fmt(r.get('cosine'), '.5f')} | {_fmt(r.get('snr_db'), '.1f')} |"
            )
        lines.append("")
    if sweep:
        timed = [r for r in sweep if "error" not in r]
        best = {}
        for r in timed:
            if r["seq_len"] not in best or r["ms"] < best[r["seq_len"]]["ms"]:
                best[r["seq_len"]] = r
        lines += [
            "Attention kernel alone (quantization excluded) per configuration; * marks the fastest per S.",
            "",
            "| S | BLOCK_M | BLOCK_N | warps | stages | P rounding | ms | TFLOP/s | % bf16 peak | cosine | SNR dB |",
            "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for r in sweep:
            head = (
                f"| {r['seq_len']} | {r['block_m']} | {r['block_n']} | {r['num_warps']} | {r['num_stages']} | "
                f"{'fp32 arithmetic' if r['fp32_rounding'] else 'hardware cast'} |"
            )
            if "error" in r:
                lines.append(f"{head} failed: {r['error']} | | | | |")
                continue
            mark = " *" if best.get(r["seq_len"]) is r else ""
            lines.append(
                f"{head} {r['ms']:.3f}{mark} | {r['tflops']:.0f} | {r['pct_bf16_peak']:.0f} | "
                f"{r['cosine']:.5f} | {r['snr_db']:.1f} |"
            )
        lines.append("")
    if quant:
        lines += [
            f"| S | op (W={meta['world_size']}) | ms | GB/s | % copy BW | torch ref ms | x ref |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for r in quant:
            lines.append(
                f"| {r['seq_len']} | {r['op']} | {r['ms']:.4f} | {r['gbps']:.0f} | {r['pct_copy_bw']:.0f} | "
                f"{r['torch_ref_ms']:.4f} | {r['speedup_vs_ref']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    require_cuda()
    import triton

    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 SDPA truth must be fp32
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = dict(
        device=torch.cuda.get_device_name(),
        date=now.isoformat(timespec="seconds"),
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        commit=git_commit(),
        **{k: v for k, v in vars(args).items() if k not in ("out",)},
    )
    meta["bf16_peak_tflops"] = measure_bf16_peak_tflops(args)
    meta["copy_gbps"] = measure_copy_gbps(args)
    attention = [] if args.skip_attention else bench_attention(args, meta["bf16_peak_tflops"])
    quant = [] if args.skip_quant else bench_quant(args, meta["copy_gbps"])
    sweep = bench_sweep(args, meta["bf16_peak_tflops"]) if args.sweep else []

    table = to_markdown(meta, attention, quant, sweep)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in meta["device"]).strip("-").lower()
    stem = os.path.join(args.out, f"kernels-{now.strftime('%Y%m%dT%H%M%SZ')}-{slug}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, attention=attention, quantization=quant, sweep=sweep), f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
