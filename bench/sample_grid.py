"""Sample the trained tiny FLUX (``cdcompile.trained``): a PNG grid, and its per-step residual diffs.

    python bench/sample_grid.py                       # bench/results/tiny_flux_samples.png (CFG 3)
    python bench/sample_grid.py --cfg 1 --out /tmp/grid.png
    python bench/sample_grid.py --residual-diffs      # bench/results/residual_diffs.{json,md}

Grid: row d is ``class_prompt(d)`` (colour and background left free, so the model picks them);
column j uses seed j, the same seed in every row. No cache: the reference quality of the model.
True CFG 3 (FluxPipeline's ``true_cfg_scale``, two transformer calls per step) by default: without
CFG the digit is right for some seeds only.

Residual diffs (at CFG 1 and 3): the pipeline runs under ``cdcompile.enable(compiler="eager", Fn=1, Bn=0)`` with
threshold 0 (nothing caches, every step computes), so each recorded diff is DBCache's decision
signal between consecutive steps, ``mean|R_s - R_{s-1}| / mean|R_{s-1}|`` of block 0's hidden
residual. A second pass runs a few real thresholds (warm-up 4) and reports the cached steps and
the PSNR of the cached image against the uncached one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cdcompile import trained  # noqa: E402


def sample_rows(pipe, digits, seeds, *, steps: int, cfg: float, weights=None):
    """PIL images, one list per digit, one image per seed."""
    rows = []
    for d in digits:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        out = pipe(**trained.class_prompt(d, cfg_scale=cfg, path=weights), num_images_per_prompt=len(seeds),
                   num_inference_steps=steps, generator=gens)
        rows.append(out.images)
    return rows


def grid(rows, zoom: int, pad: int = 2):
    from PIL import Image

    w, h = rows[0][0].size
    tw, th = w * zoom + pad, h * zoom + pad
    canvas = Image.new("RGB", (len(rows[0]) * tw + pad, len(rows) * th + pad), (128, 128, 128))
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            canvas.paste(im.resize((w * zoom, h * zoom), Image.NEAREST), (pad + j * tw, pad + i * th))
    return canvas


def caption(image, lines: list[str], size: int = 14, pad: int = 6):
    """``image`` with ``lines`` of text on a white band below it (what ran, where, with which versions)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    band = Image.new("RGB", (image.width, pad + len(lines) * (size + 4) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    for k, text in enumerate(lines):
        draw.text((pad, pad + k * (size + 4)), text, fill=(0, 0, 0), font=font)
    out = Image.new("RGB", (image.width, image.height + band.height))
    out.paste(image, (0, 0))
    out.paste(band, (0, image.height))
    return out


def residual_diffs(weights, *, digits, seeds, steps: int, cfg: float) -> dict:
    """Per-step diffs at threshold 0, and cached steps / PSNR at a few thresholds (warm-up 4)."""
    import statistics

    import cdcompile
    from cdcompile import metrics

    def run(threshold: float, warmup: int):
        torch._dynamo.reset()  # instances of one class share Dynamo's code: one config per reset
        pipe = trained.load_trained_pipeline(weights)
        cdcompile.enable(pipe, compiler="eager", Fn_compute_blocks=1, Bn_compute_blocks=0,
                         residual_diff_threshold=threshold, max_warmup_steps=warmup)
        images, requests = [], []
        for d in digits:
            for s in seeds:
                out = pipe(**trained.class_prompt(d, cfg_scale=cfg, path=weights), num_inference_steps=steps,
                           generator=torch.Generator().manual_seed(s), output_type="np")
                images.append(out.images[0])
                # the history keeps the last few requests: read it after every request
                requests.append(cdcompile.summary(pipe.transformer).as_dict()["requests"][-1])
        return images, requests

    def stats(values):
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    reference, requests = run(0.0, 0)
    n_slots = len(requests[0]["slots"])  # 1 without CFG; 2 with (conditional, unconditional)
    per_slot = []
    for k in range(n_slots):
        per_step = {}
        for r in requests:
            for step, diff in r["slots"][k]["residual_diffs"].items():
                per_step.setdefault(int(step), []).append(diff)
        every = [d for ds in per_step.values() for d in ds]
        per_slot.append({
            "slot": k, "overall": stats(every),
            "median_steps_1_to_4": statistics.median(d for s in (1, 2, 3, 4) for d in per_step[s]),
            "median_steps_5_on": statistics.median(d for s, ds in per_step.items() if s >= 5 for d in ds),
            "per_step": [{"step": s, **stats(ds)} for s, ds in sorted(per_step.items())]})
    sweep = []
    for threshold in (0.05, 0.08, 0.12, 0.2, 0.3):
        images, cached_requests = run(threshold, 4)
        cached = [len(r["slots"][0]["cached_steps"]) for r in cached_requests]
        psnrs = [metrics.psnr(a, b) for a, b in zip(reference, images)]
        sweep.append({"threshold": threshold, "max_warmup_steps": 4,
                      "cached_steps_slot0": {"mean": statistics.mean(cached), "min": min(cached),
                                             "max": max(cached)},
                      "psnr_db_vs_uncached": {"median": statistics.median(psnrs), "min": min(psnrs)}})
    return {"cfg": cfg, "requests": len(requests), "steps": steps, "digits": list(digits), "seeds": list(seeds),
            "slots": per_slot, "threshold_sweep": sweep}


def write_residual_report(docs: list[dict], out_json: Path, out_md: Path) -> None:
    import datetime
    import json

    import diffusers

    out_json.write_text(json.dumps({
        "what": "DBCache's signal between consecutive steps: mean|R_s - R_(s-1)| / mean|R_(s-1)|, "
                "R = hidden residual of block 0 (F1B0), threshold 0 so every step computes",
        "runs": docs, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}, indent=1) + "\n")
    lines = ["# Residual diffs of the trained tiny FLUX", "",
             "DBCache's decision signal between consecutive steps, `mean|R_s - R_(s-1)| / mean|R_(s-1)|` of "
             "block 0's hidden residual (F1B0, threshold 0 so every step computes), over "
             f"{docs[0]['requests']} requests (digits 0-9 x 2 seeds), {docs[0]['steps']} steps. "
             "Written by `python bench/sample_grid.py --residual-diffs`.", ""]
    for doc in docs:
        for slot in doc["slots"]:
            o = slot["overall"]
            name = "conditional" if slot["slot"] == 0 else "unconditional"
            lines.append(f"- CFG {doc['cfg']:g}, slot {slot['slot']} ({name}): median {o['median']:.3f} "
                         f"(min {o['min']:.3f}, max {o['max']:.3f}); steps 1-4 median "
                         f"{slot['median_steps_1_to_4']:.3f}, steps 5+ median {slot['median_steps_5_on']:.3f}")
    header = " | ".join(f"CFG {d['cfg']:g} slot {s['slot']} median (min-max)" for d in docs for s in d["slots"])
    lines += ["", f"| step | {header} |", "|---:" + "|---:" * sum(len(d["slots"]) for d in docs) + "|"]
    for i, row in enumerate(docs[0]["slots"][0]["per_step"]):
        cells = []
        for d in docs:
            for s in d["slots"]:
                r = s["per_step"][i]
                cells.append(f"{r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})")
        lines.append(f"| {row['step']} | " + " | ".join(cells) + " |")
    lines += ["", "Real thresholds (F1B0, warm-up 4): cached steps of slot 0 per request, and the PSNR of the "
              "cached image against the uncached one (`cdcompile.metrics.psnr`, float, data range 1; inf = "
              "identical, nothing cached).", "",
              "| CFG | threshold | cached steps: mean (min-max) | PSNR dB: median (min) |",
              "|---:|---:|---:|---:|"]
    for doc in docs:
        for r in doc["threshold_sweep"]:
            c, p = r["cached_steps_slot0"], r["psnr_db_vs_uncached"]
            lines.append(f"| {doc['cfg']:g} | {r['threshold']} | {c['mean']:.1f} ({c['min']}-{c['max']}) "
                         f"| {p['median']:.1f} ({p['min']:.1f}) |")
    out_md.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", type=Path, default=None, help="default: the committed weights")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--cfg", type=float, default=3.0, help="true CFG scale (1 = no CFG)")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--zoom", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/tiny_flux_samples.png")
    ap.add_argument("--residual-diffs", action="store_true",
                    help="measure the per-step residual diffs instead of drawing the grid")
    ap.add_argument("--results", type=Path, default=ROOT / "bench/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.residual_diffs:
        start = time.perf_counter()
        docs = [residual_diffs(args.weights, digits=range(10), seeds=range(2), steps=args.steps, cfg=cfg)
                for cfg in (1.0, 3.0)]
        write_residual_report(docs, args.results / "residual_diffs.json", args.results / "residual_diffs.md")
        print((args.results / "residual_diffs.md").read_text())
        print(f"{time.perf_counter() - start:.0f} s")
        return

    pipe = trained.load_trained_pipeline(args.weights)
    start = time.perf_counter()
    rows = sample_rows(pipe, range(10), range(args.seeds), steps=args.steps, cfg=args.cfg, weights=args.weights)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "bench"))
    import _harness as H

    m = H.metadata("cpu")
    dirty = " (dirty)" if m["git_dirty"] else ""
    caption(grid(rows, args.zoom), [
        f"cdcompile.trained tiny FLUX: rows digits 0-9, columns seeds 0-{args.seeds - 1}; {args.steps} steps, "
        f"true CFG {args.cfg:g}, no cache",
        f"{m['cpu']} ({m['cpu_cores']} cores), torch {m['torch']}, diffusers {m['diffusers']}",
        f"commit {m['git_commit'][:12]}{dirty}, {m['date']}",
    ]).save(args.out)
    print(f"wrote {args.out}: 10 digits x {args.seeds} seeds, {args.steps} steps, cfg {args.cfg}, "
          f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
