"""Ulysses context parallelism (issue 7): bytes moved and time per step on CPU ranks, and a model
of FLUX.1-dev on 2/4/8 GPUs.

    OMP_NUM_THREADS=1 python bench/cp.py                   # CPU, gloo: 1, 2 and 3 ranks (minutes)
    python bench/cp.py --ranks 1 2 --steps 3 --out /tmp/cp_cpu
    python bench/cp.py --zoo                               # every zoo model on 2 ranks: parity table

Measured (CPU):

1. One FLUX-architecture transformer "tiny but wide" (random weights, fp32): 2 double + 4 single
   blocks, 8 heads x 64, 1024 image + 64 text tokens. Every configuration runs in its own set of
   ``W`` processes (``torch.multiprocessing.spawn``, gloo on 127.0.0.1, one thread each). What
   runs is the graph the backend hands its inner compiler (``cdcompile.backend.build`` on Dynamo's
   graph), run op by op as ``compiler="eager"`` does: the passes are measured, not inductor's code
   generation. Block cache off.
2. Time per step: one warm-up call, then ``steps`` calls, each between two barriers (so it is the
   slowest rank's time); configurations alternate over ``rounds`` rounds (rotated order) and the
   median over all calls is reported. With 3 processes on 2 cores, ranks share cores:
   3-rank times measure oversubscription as much as parallelism.
3. Bytes per step: a ``TorchDispatchMode`` records every functional collective the compiled graph
   issues in one call: the payload each rank hands to ``all_to_all_single`` /
   ``all_gather_into_tensor`` (values, plus FP8 scales), and the part of it addressed to other
   ranks. Reported per rank (rank 0) and summed over ranks. The byte model below is checked
   against these counts.

Modelled (not measured; no GPU in this run): FLUX.1-dev at 1024x1024 (4096 image + 512 text
tokens, 24 heads x 128, 19 double + 38 single blocks, bf16, batch 1) on W = 1, 2, 4, 8 H100 with
NVLink. Per step on each GPU:

    compute(W)  = (GEMM FLOPs / W) / gemm_rate + (attention FLOPs / W) / attn_rate
    exchange(W) = 57 attentions x 4 all-to-alls x (latency + off-rank bytes / a2a_bandwidth)
    step(W)     = compute(W) + exchange(W) x (1 - overlap)

with off-rank bytes per all-to-all = (S / W) x H x D x bytes_per_value x (W - 1) / W (bf16: 2; FP8:
1 + 4 / D for Q, V, O with a per-(token, head) scale, K stays bf16), the same formula the CPU
counts confirm. The rates are parameters (``--gemm-tflops``, ``--attn-tflops``, ``--a2a-gbps``,
``--a2a-latency-us``, ``--overlap``) whose defaults are assumptions stated in the result file, to be
replaced by measurements of one H100 (SDPA and GEMM throughput at this shape) and of an NVLink
all-to-all when a multi-GPU machine is available.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from bench import _harness as H  # noqa: E402

WIDE = dict(num_layers=2, num_single_layers=4, heads=8, head_dim=64)
TOKENS, TEXT = 1024, 64


class CommBytes(TorchDispatchMode):
    """Counts the payload of every functional collective issued while active."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank
        self.payload = 0  # bytes this rank hands to collectives
        self.off_rank = 0  # of which addressed to other ranks
        self.a2a_off_rank = 0  # the all-to-alls' share of off_rank
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._opname if func.namespace == "_c10d_functional" else None
        if name in ("all_to_all_single", "all_gather_into_tensor", "all_reduce"):
            x = args[0]
            nbytes = x.numel() * x.element_size()
            self.payload += nbytes
            self.calls[name] = self.calls.get(name, 0) + 1
            if name == "all_to_all_single":
                in_splits = args[2]
                row = nbytes // max(1, sum(in_splits))
                self.off_rank += nbytes - in_splits[self.rank] * row
                self.a2a_off_rank += nbytes - in_splits[self.rank] * row
            elif name == "all_gather_into_tensor":
                self.off_rank += nbytes * (args[1] - 1)
            else:
                self.off_rank += nbytes
        return func(*args, **kwargs)


def _worker(rank, world, port, fp8, overlap, steps, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from cdcompile.testing import flux_inputs, tiny_flux

    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    from cdcompile import CacheConfig
    from cdcompile.backend import build

    model = tiny_flux(**WIDE)
    kw = flux_inputs(model, tokens=TOKENS, text_tokens=TEXT)
    captured = []

    def capture(gm, example_inputs):
        captured.append((gm, example_inputs))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=capture, fullgraph=True)(**kw)
    gm, ex = captured[0]
    t0 = time.perf_counter()
    # The graph the backend hands its inner compiler; compiler="eager" runs exactly this.
    gm2, _ = build(gm, ex, CacheConfig(compiler="eager", enable_cache=False, ulysses_degree=world, ulysses_fp8=fp8,
                                         ulysses_async=overlap))

    def c(**_):
        return gm2(*ex)

    def barrier():
        if world > 1:
            dist.barrier()

    with torch.no_grad():
        ref = c(**kw)[0]
        compile_s = time.perf_counter() - t0
        counter = CommBytes(rank)
        with counter:
            c(**kw)
        times = []
        for _ in range(steps):
            barrier()
            t0 = time.perf_counter()
            c(**kw)
            barrier()
            times.append(time.perf_counter() - t0)
    torch.save(dict(times=times, payload=counter.payload, off_rank=counter.off_rank,
                    a2a_off_rank=counter.a2a_off_rank, calls=counter.calls,
                    out=ref, compile_s=compile_s), os.path.join(outdir, f"rank{rank}.pt"))
    if world > 1:
        dist.destroy_process_group()


def _zoo_worker(rank, world, port, names, outdir):
    """Every zoo model on ``world`` ranks: the rewritten graph against the model run in one process."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from cdcompile import CacheConfig, zoo
    from cdcompile.backend import build, collect_reports

    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    for name in names:
        row = dict(model=name)
        try:
            model, kw = zoo.ZOO[name]()
            graphs = []

            def capture(gm, example_inputs):
                graphs.append((gm, example_inputs))
                return gm.forward

            torch._dynamo.reset()
            with torch.no_grad():
                ref = torch.compile(model, backend=capture)(**kw)
            ref = getattr(ref, "sample", ref)
            while isinstance(ref, (tuple, list)):
                ref = ref[0]
            row["graphs"] = len(graphs)
            if len(graphs) == 1:
                gm2, ctx = build(graphs[0][0], graphs[0][1], CacheConfig(
                    compiler="eager", enable_cache=False, ulysses_degree=world))
                rec = ctx.context_parallel
                row.update(applied=rec.applied, reason=rec.reason, attention=rec.attention,
                           streams=rec.sharded_streams, unsharded_groups=rec.unsharded_groups)
                if rec.applied:
                    with torch.no_grad():
                        out = gm2(*graphs[0][1])
                    out = out[0] if isinstance(out, (tuple, list)) else out
                    row.update(max_abs_err=(out - ref).abs().max().item(), scale=ref.abs().max().item())
            else:  # the model breaks its own graph: the backend on every graph, as torch.compile runs it
                torch._dynamo.reset()
                with collect_reports() as reports, torch.no_grad():
                    out = torch.compile(model, backend="cachedit", options=dict(
                        compiler="eager", enable_cache=False, ulysses_degree=world))(**kw)
                out = getattr(out, "sample", out)
                while isinstance(out, (tuple, list)):  # Z-Image returns a list of per-sample outputs
                    out = out[0]
                recs = [r.context_parallel for r in reports if r.context_parallel is not None]
                done = [r for r in recs if r.applied]
                tried = [r for r in recs if r.reason != "no repeated block group in this graph"]
                attention: dict[str, int] = {}
                for r in done:
                    for k, v in r.attention.items():
                        attention[k] = attention.get(k, 0) + v
                row.update(applied=bool(done), attention=attention,
                           streams=[s for r in done for s in r.sharded_streams],
                           unsharded_groups=[g for r in done for g in r.unsharded_groups],
                           reason=next((r.reason for r in tried if not r.applied), None)
                           or next((r.reason for r in done if r.reason), None)
                           or (None if done else f"none of its {len(graphs)} graphs holds a repeated block "
                                                 "group (its graph breaks fall inside the blocks)"))
                if done:
                    row.update(max_abs_err=(out - ref).abs().max().item(), scale=ref.abs().max().item())
        except Exception as e:  # a zoo builder or a trace failing is a row, not the end of the sweep
            row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        rows.append(row)
    if rank == 0:
        torch.save(rows, os.path.join(outdir, "zoo.pt"))
    dist.destroy_process_group()


def run_zoo(world: int, out: str) -> None:
    import torch.multiprocessing as mp

    from cdcompile.zoo import ZOO

    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_zoo_worker, args=(world, _free_port(), list(ZOO), d), nprocs=world, join=True)
        rows = torch.load(os.path.join(d, "zoo.pt"), weights_only=False)
    applied = [r for r in rows if r.get("applied")]
    header = ["model", "sharded", "attention", "sharded streams", "max|err| vs 1 process",
              "not sharded (or groups left out) because"]

    def why(r):
        graphs = f"{r['graphs']} graphs (the model breaks its graph): " if r.get("graphs", 1) != 1 else ""
        if r.get("error"):
            return graphs + r["error"]
        if r.get("applied") and r.get("unsharded_groups"):
            return f"{graphs}left {', '.join(r['unsharded_groups'])} unsharded: {r.get('reason')}"
        if r.get("applied") and r.get("reason"):  # a graph of a model that breaks its graph stayed unsharded
            return f"{graphs}one graph unsharded: {r['reason']}"
        return (graphs + (r.get("reason") or "")).rstrip(": ")

    table = [[r["model"], "yes" if r.get("applied") else "no",
              ", ".join(f"{k} {v}" for k, v in (r.get("attention") or {}).items()),
              ", ".join(r.get("streams") or []), f"{r['max_abs_err']:.1e}" if "max_abs_err" in r else "-", why(r)]
             for r in rows]
    meta = H.metadata("cpu", world=world)
    worst = max((r["max_abs_err"] / max(r["scale"], 1e-12) for r in applied if "max_abs_err" in r), default=0.0)
    md = f"""# Ulysses context parallelism over the diffusers DiT zoo (bench/cp.py --zoo)

{meta['date']}; torch {meta['torch']}, diffusers {meta['diffusers']}; commit `{meta['git_commit'][:12]}`{' + uncommitted changes' if meta['git_dirty'] else ''}.

Every tiny model of cdcompile.zoo on {world} CPU ranks (gloo): Dynamo's graph, the backend's passes
(block cache off), the rewritten graph run on every rank, compared with the model run in one process
(fp32). A model that breaks its own graph runs whole under `torch.compile(backend="cachedit")`, each
of its graphs through the passes, and its output is compared. Sharded: {len(applied)} of {len(rows)} models; largest error relative to the output's
largest magnitude: {worst:.1e}. "ulysses" = all-to-all attention, "local" = cross-attention to
replicated (unsharded) text with no exchange.

{H.markdown_table(header, table)}
"""
    H.write_results(out, dict(meta=meta, rows=rows), md)
    print(f"sharded {len(applied)}/{len(rows)}; wrote {out}.json / .md")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(world: int, fp8: bool, overlap: bool, steps: int) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, _free_port(), fp8, overlap, steps, d), nprocs=world, join=True)
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def modelled_bytes(tokens: int, heads: int, head_dim: int, world: int, attentions: int, fp8: bool,
                   value_bytes: int, batch: int = 1) -> dict[str, float]:
    """Off-rank bytes per step and rank of Ulysses: 4 all-to-alls per attention (Q, K, V in, O out).

    Heads are padded to a multiple of ``world``; a rank's tokens are ``tokens / world`` (uneven
    splits move the same total).
    """
    if world == 1:
        return dict(per_rank=0.0, total=0.0)
    hp = -(-heads // world) * world
    rows = tokens / world * batch * hp  # (token, head) rows a rank holds per tensor
    plain = rows * head_dim * value_bytes
    quant = rows * (head_dim + 4)  # e4m3 values + one fp32 scale per row
    per_tensor = [quant if fp8 else plain, plain, quant if fp8 else plain, quant if fp8 else plain]  # Q K V O
    per_rank = attentions * sum(per_tensor) * (world - 1) / world
    return dict(per_rank=per_rank, total=per_rank * world)


def flux_dev_model(args, world: int, fp8: bool) -> dict[str, float]:
    """Per-step time of FLUX.1-dev on ``world`` GPUs (a model; see the module docstring)."""
    s, h, d, dim = 4096 + 512, 24, 128, 3072
    attentions = 19 + 38
    # GEMM FLOPs per token: double blocks carry two streams' weights but each token sees one set:
    # qkv + out (4 dim^2) + MLP (8 dim^2) per block; single blocks: qkv (3) + mlp in (4) + out (5).
    gemm = 2 * s * (19 * 12 + 38 * 12) * dim * dim
    attn = attentions * 4 * s * s * h * d
    compute = gemm / world / (args.gemm_tflops * 1e12) + attn / world / (args.attn_tflops * 1e12)
    b = modelled_bytes(s, h, d, world, attentions, fp8, value_bytes=2)
    exchanges = attentions * 4 if world > 1 else 0
    comm = exchanges * args.a2a_latency_us * 1e-6 + b["per_rank"] / (args.a2a_gbps * 1e9)
    step = compute + comm * (1 - args.overlap)
    return dict(world=world, fp8=fp8, compute_ms=compute * 1e3, exchange_ms=comm * 1e3, step_ms=step * 1e3,
                bytes_per_gpu_mb=b["per_rank"] / 1e6)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds over the configurations")
    p.add_argument("--out", default=os.path.join(H.ROOT, "bench", "results", "cp_cpu"))
    # Model assumptions (H100 SXM): dense bf16 peak 989 TFLOP/s (NVIDIA H100 datasheet); NVLink 4
    # 450 GB/s per direction per GPU (same). Achieved fractions are guesses until measured.
    p.add_argument("--gemm-tflops", type=float, default=600.0, help="achieved GEMM rate (~60%% of 989)")
    p.add_argument("--attn-tflops", type=float, default=450.0, help="achieved SDPA rate at S=4608, D=128")
    p.add_argument("--a2a-gbps", type=float, default=300.0, help="achieved all-to-all off-rank GB/s per GPU")
    p.add_argument("--a2a-latency-us", type=float, default=20.0, help="fixed cost per all-to-all")
    p.add_argument("--overlap", type=float, default=0.0, help="fraction of exchange time hidden (ulysses_async)")
    p.add_argument("--zoo", action="store_true", help="instead: every zoo model on 2 ranks vs one process")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.zoo:
        run_zoo(2, os.path.join(H.ROOT, "bench", "results", "cp_zoo"))
        return

    rows, check = [], []
    single = None
    configs = [(w, fp8, overlap) for w in args.ranks
               for fp8, overlap in ([(False, False)] if w == 1 else [(False, False), (True, False), (False, True)])]
    runs: dict[tuple, list] = {c: [] for c in configs}
    for rnd in range(args.rounds):  # configurations alternate; each round in a rotated order
        for cfg in configs[rnd % len(configs):] + configs[:rnd % len(configs)]:
            runs[cfg].append(run_config(*cfg, args.steps))
    for world, fp8, overlap in configs:
        res = runs[(world, fp8, overlap)][0]
        r0 = res[0]
        step_ms = H.median(t for rr in runs[(world, fp8, overlap)] for t in rr[0]["times"]) * 1e3
        if world == 1:
            single = (step_ms, r0["out"])
        err = (r0["out"] - single[1]).abs().max().item() if single else None
        m = modelled_bytes(TOKENS + TEXT, WIDE["heads"], WIDE["head_dim"], world, 6, fp8, value_bytes=4)
        rows.append(dict(ranks=world, fp8=fp8, overlap=overlap, step_ms=step_ms,
                         speedup=single[0] / step_ms if single else None,
                         payload_per_rank_mb=r0["payload"] / 1e6, off_rank_per_rank_mb=r0["off_rank"] / 1e6,
                         off_rank_total_mb=sum(x["off_rank"] for x in res) / 1e6,
                         collectives=r0["calls"], max_abs_err_vs_1_rank=err, compile_s=r0["compile_s"]))
        if world > 1 and not overlap:
            check.append(dict(ranks=world, fp8=fp8, measured_a2a_off_rank=r0["a2a_off_rank"],
                              modelled=m["per_rank"]))
        print(f"ranks={world} fp8={fp8} async={overlap}: {step_ms:.1f} ms/step, "
              f"off-rank {r0['off_rank'] / 1e6:.2f} MB/rank", flush=True)

    model_rows = [flux_dev_model(args, w, fp8) for w in (1, 2, 4, 8) for fp8 in ((False,) if w == 1 else (False, True))]
    base = model_rows[0]["step_ms"]
    for r in model_rows:
        r["speedup"] = base / r["step_ms"]

    meta = H.metadata("cpu", model=f"FLUX architecture {WIDE}, {TOKENS} image + {TEXT} text tokens, fp32",
                      compiler="eager", steps=args.steps)
    assumptions = {k: getattr(args, k) for k in ("gemm_tflops", "attn_tflops", "a2a_gbps", "a2a_latency_us", "overlap")}
    header = ["ranks", "fp8", "async", "ms/step", "speedup", "payload MB/rank", "off-rank MB/rank", "off-rank MB total",
              "max|err| vs 1 rank"]
    table = [[r["ranks"], r["fp8"], r["overlap"], r["step_ms"], r["speedup"], r["payload_per_rank_mb"],
              r["off_rank_per_rank_mb"], r["off_rank_total_mb"],
              "-" if r["max_abs_err_vs_1_rank"] is None else f"{r['max_abs_err_vs_1_rank']:.1e}"]
             for r in rows]
    mheader = ["GPUs", "fp8", "compute ms", "exchange ms", "step ms", "speedup", "off-rank MB/GPU/step"]
    mtable = [[r["world"], r["fp8"], r["compute_ms"], r["exchange_ms"], r["step_ms"], r["speedup"],
               r["bytes_per_gpu_mb"]] for r in model_rows]
    print(H.text_table(header, table))
    print(H.text_table(mheader, mtable))
    checks = "\n".join(f"- {c['ranks']} ranks, fp8={c['fp8']}: all-to-all off-rank bytes per rank measured "
                       f"{c['measured_a2a_off_rank'] / 1e6:.3f} MB, byte model {c['modelled'] / 1e6:.3f} MB"
                       for c in check)
    fp8_ratio = next((c["measured_a2a_off_rank"] for c in check if c["fp8"]), 0) / max(
        1, next((c["measured_a2a_off_rank"] for c in check if not c["fp8"]), 1))
    md = f"""# Ulysses context parallelism (bench/cp.py)

{meta['date']} on {meta['cpu']} ({meta['cpu_cores']} cores, 1 thread per rank); torch {meta['torch']}, diffusers {meta['diffusers']}; commit `{meta['git_commit'][:12]}`{' + uncommitted changes' if meta['git_dirty'] else ''}.

## Measured: CPU ranks (gloo)

{meta['model']}; backend compiler "eager", block cache off; one process per rank. ms/step: median of {args.steps} calls x {args.rounds} alternating rounds, each call between barriers (the slowest rank). Bytes: one call's functional-collective payloads counted by a dispatch mode (values + FP8 scales; "off-rank" = addressed to other ranks; includes the all-gather of the hidden stream at the exit). With 3 ranks on 2 cores, ranks share cores.

{H.markdown_table(header, table)}

Byte model vs measurement (all-to-alls only; the model takes the average rank, rank 0 holds the extra token of an uneven split):
{checks}

Reading: FP8 sends Q, V and O as 1 byte per value plus one 4-byte scale per (token, head); K stays in
the model dtype. The all-to-all bytes drop to {fp8_ratio:.2f}x here (fp32 values), 0.64x with bf16
(the FLUX.1-dev model below). On this CPU FP8 is slower: the quantize/dequantize ops run their
plain-torch reference and loopback gloo is cheap, so quantizing costs more time than the smaller
messages save. ``async`` issues each exchange before the remaining projections (gloo's worker
thread sends while the main thread computes); on 2 shared cores that thread competes with the
compute threads, and the async and sync rows differ by about this machine's run-to-run noise
(which way has changed between runs). The overlap is meant for GPUs, where NCCL runs on its own stream.

## Modelled, not measured: FLUX.1-dev shape on H100s

4096 image + 512 text tokens, 24 heads x 128, 57 attentions per step, bf16, batch 1. step = compute / W + exchange x (1 - overlap); exchange = 4 all-to-alls per attention (latency + off-rank bytes / bandwidth). Assumed rates (not measured; replace with measurements): {assumptions}.

{H.markdown_table(mheader, mtable)}
"""
    H.write_results(args.out, dict(meta=meta, measured=rows, byte_model_check=check, model=model_rows,
                                   model_assumptions=assumptions), md)
    print(f"wrote {args.out}.json / .md")


if __name__ == "__main__":
    main()
