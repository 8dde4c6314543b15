"""Run every model of ``cdcompile.zoo.ZOO`` through the backend: what it finds, and whether it is exact.

    python bench/zoo.py                                   # all models, table on stdout
    python bench/zoo.py --only flux2,qwenimage            # a few
    python bench/zoo.py --json bench/results/zoo.json --markdown bench/results/zoo.md
    python bench/zoo.py --inductor                        # Inductor, block cache in the graph

Per model: build the toy model, run ``cdcompile.explain`` (graphs, graph breaks, block groups) under
``torch.no_grad()``, then compile it with the ``cachedit`` backend (``aot_eager``, caching off) and
compare its output with eager's. A row is ``ok`` when every output tensor is allclose (rtol = atol =
1e-4) and at least one block group was found. A model that raises keeps its row, with the error.
With ``--inductor`` the compile stage uses Inductor with the block cache in the graph at threshold 0
(the cond and both branches compiled, every call computes) and compares two calls with eager.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import cdcompile  # noqa: E402
from cdcompile.passes import _fx  # noqa: E402
from cdcompile.zoo import ZOO  # noqa: E402

RTOL = ATOL = 1e-4
OPTIONS = {"compiler": "aot_eager", "enable_cache": False}
INDUCTOR_OPTIONS = {"compiler": "inductor", "residual_diff_threshold": 0.0, "max_warmup_steps": 0}


def tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model output (tensor, tuple/list, dict or diffusers ``BaseOutput``), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):  # BaseOutput is an OrderedDict
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in tensors(o)]
    return []


def compare(eager: Any, compiled: Any) -> tuple[float, bool]:
    a, b = tensors(eager), tensors(compiled)
    if not a or len(a) != len(b):
        raise ValueError(f"eager gave {len(a)} output tensor(s), compiled {len(b)}")
    diff, close = 0.0, True
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise ValueError(f"output shape {tuple(y.shape)} != eager {tuple(x.shape)}")
        x, y = x.detach().float(), y.detach().float()
        diff = max(diff, (x - y).abs().max().item() if x.numel() else 0.0)
        close = close and torch.allclose(x, y, rtol=RTOL, atol=ATOL)
    return diff, close


def _error(stage: str, e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{stage}: {type(e).__name__}: {msg[0][:300] if msg else ''}".rstrip(": ")


def run_one(name: str, options: dict = OPTIONS, calls: int = 1) -> dict:
    """One model's row; ``calls`` compiled calls are each compared with eager."""
    row: dict[str, Any] = {"model": name, "class": None, "graphs": None, "graph_breaks": None, "groups": [],
                           "max_abs_diff": None, "ok": False, "error": None}
    stage = "build"
    t0 = time.perf_counter()
    try:
        model, kwargs = ZOO[name]()
        row["class"] = type(model).__name__
        with torch.no_grad():
            stage = "eager"
            eager = model(**kwargs)
            stage = "explain"
            report = cdcompile.explain(model, **kwargs)
            row["graphs"], row["graph_breaks"] = report.graphs, report.graph_breaks
            row["groups"] = [{"name": g["name"], "blocks": g["blocks"], "streams": g["streams"]}
                             for g in report.groups]
            row["break_reasons"] = report.break_reasons
            row["rejected"] = [r for gr in report.graph_reports for r in gr.rejected]
            # explain compiles with the block cache on (default options): did it go in, or why not
            caches = [gr.cache for gr in report.graph_reports if gr.cache]
            row["cached"] = bool(caches)
            row["cache"] = caches[0] if caches else None
            row["not_cached"] = [w for gr in report.graph_reports for w in gr.not_cached]
            stage = "compile"
            torch._dynamo.reset()
            row["sdpa"], row["sdpa_masked"] = 0, 0

            def backend(gm, example_inputs):  # counts SDPA calls (the FP8 attention's candidates), then compiles
                for n in gm.graph.nodes:
                    if n.op == "call_function" and _fx.target_name(n) == "scaled_dot_product_attention":
                        row["sdpa"] += 1
                        row["sdpa_masked"] += _fx.sdpa_args(n).get("attn_mask") is not None
                return cdcompile.cachedit(gm, example_inputs, options=options)

            compiled = torch.compile(model, backend=backend)
            outs = [compiled(**kwargs) for _ in range(calls)]
        stage = "compare"
        diffs = [compare(eager, out) for out in outs]
        row["max_abs_diff"], close = max(d for d, _ in diffs), all(c for _, c in diffs)
        row["ok"] = bool(close and row["groups"])
    except Exception as e:  # one failing model keeps its row
        row["error"] = _error(stage, e)
        if os.environ.get("ZOO_TRACEBACK"):
            traceback.print_exc()
    finally:
        torch._dynamo.reset()
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _groups_cell(row: dict) -> str:
    return "; ".join(f"{g['name']} x{g['blocks']} [{','.join(g['streams'])}]" for g in row["groups"]) or "-"


def _diff_cell(row: dict) -> str:
    d = row["max_abs_diff"]
    return "-" if d is None else f"{d:.1e}"


COLUMNS = ("model", "graphs", "breaks", "groups (name xblocks [streams])", "max_abs_diff", "ok", "error")


def _cells(row: dict) -> list[str]:
    none = lambda v: "-" if v is None else str(v)  # noqa: E731
    return [row["model"], none(row["graphs"]), none(row["graph_breaks"]), _groups_cell(row), _diff_cell(row),
            "yes" if row["ok"] else "no", row["error"] or ""]


def totals(rows: list[dict]) -> dict:
    return {"models": len(rows), "ok": sum(r["ok"] for r in rows),
            "with_groups": sum(bool(r["groups"]) for r in rows),
            "cached": sum(bool(r.get("cached")) for r in rows),
            "attn_mask": sum(bool(r.get("sdpa_masked")) for r in rows),
            "failed": sum(r["error"] is not None for r in rows)}


def _totals_line(rows: list[dict]) -> str:
    t = totals(rows)
    return (f"{t['models']} models: {t['ok']} ok, {t['with_groups']} with groups, "
            f"{t['cached']} with the block cache in the graph, {t['failed']} failed; "
            f"{t['attn_mask']} pass an attn_mask to SDPA")


def text_table(rows: list[dict]) -> str:
    cells = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS) - 1)]
    lines = []
    for c in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(c, widths)) + "  " + c[-1])
    lines.insert(1, "-" * min(160, max(len(x) for x in lines)))
    return "\n".join(lines) + "\n" + _totals_line(rows)


def _short_break(reason: str) -> str:
    """``Dynamic shape operator (aten.nonzero.default) at attention_processor.py:1068`` from a break reason."""
    first = re.sub(r" at \S+$", "", reason.splitlines()[0]).strip()
    first = re.sub(r"\S*/site-packages/", "", first)
    op = re.search(r"Operator `([^`]+)`", reason)
    where = re.search(r" at (\S+):(\d+)$", reason)
    return (first + (f" ({op.group(1)})" if op else "")
            + (f" at {os.path.basename(where.group(1))}:{where.group(2)}" if where else ""))


def _why_not(row: dict) -> str:
    """For a row without groups: what discovery rejected and why, or where the graph breaks."""
    if row["groups"] or row["error"]:
        return ""
    rejected = [r for r in row.get("rejected") or [] if r["reason"] != "no_repeated_blocks"]
    if rejected:
        return "; ".join(f"{r['name']}: {r['reason']} ({r['detail']})" for r in rejected)
    if row.get("graph_breaks"):
        breaks = list(dict.fromkeys(_short_break(b) for b in row["break_reasons"]))
        return f"{row['graphs']} graphs, none holds two blocks; breaks: " + "; ".join(breaks)
    return "no repeated blocks"


def _cache_cell(row: dict) -> str:
    """F/M/B and cached streams when the block cache went in, else the first reason it did not."""
    c = row.get("cache")
    if c:
        clock = {"own": "timestep input", "borrowed": "timestep of an earlier graph"}.get(
            c.get("timestep_source"), "no timestep")
        return f"yes: F{c['Fn']} M{c['Mn']} B{c['Bn']} [{','.join(c['streams'])}], clock: {clock}"
    reasons = [w for w in row.get("not_cached") or [] if w != "no repeated block group in this graph"]
    return "no" + (f": {reasons[0]}" if reasons else "") if row.get("groups") else ""


def markdown_table(rows: list[dict], meta: dict) -> str:
    head = ["model", "class", "graphs", "breaks", "groups (name xblocks [streams])", "max_abs_diff", "ok", "error",
            "why no group", "block cache (default options)", "SDPA calls (with attn_mask)"]
    esc = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    dyn = " with Dynamo capturing data-dependent ops" if meta.get("capture_dynamic") else ""
    lines = [
        "# cdcompile zoo",
        "",
        f"`python bench/zoo.py` on torch {meta['torch']}, diffusers {meta['diffusers']}, commit "
        f"`{meta['git_commit'][:12]}`{' (dirty)' if meta.get('git_dirty') else ''}, {meta['date']}{dyn}. "
        f"Backend options `{json.dumps(meta['options'])}`; ok = outputs allclose to eager "
        f"(rtol = atol = {RTOL:g}) and at least one block group found. The last column: whether "
        f"`cdcompile.explain` (default options, block cache on) put the cache into the graph, and what "
        f"its clock (steps, requests, CFG slots) reads. SDPA calls: those of the compiled graphs, and how many "
        f"pass an `attn_mask` (`fp8_attention=True` takes both kinds).",
        "",
        "**" + _totals_line(rows) + "**",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for r in rows:
        c = _cells(r)
        sdpa = f"{r['sdpa']} ({r['sdpa_masked']})" if r.get("sdpa") is not None else "-"
        vals = [c[0], r["class"] or "-", c[1], c[2], c[3], c[4], c[5], c[6], _why_not(r), _cache_cell(r), sdpa]
        lines.append("| " + " | ".join(esc(v) for v in vals) + " |")
    return "\n".join(lines) + "\n"


def metadata(options: dict = OPTIONS) -> dict:
    import diffusers

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "git_commit": git("rev-parse", "HEAD") or "unknown",
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "options": options,
        "rtol": RTOL,
        "atol": ATOL,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated ZOO names (default: all)")
    p.add_argument("--json", metavar="PATH", help="write {meta, totals, rows} here")
    p.add_argument("--markdown", metavar="PATH", help="write the table as markdown here")
    p.add_argument("--capture-dynamic", action="store_true",
                   help="let Dynamo capture data-dependent ops (nonzero, .item(), ...) instead of breaking the graph")
    p.add_argument("--inductor", action="store_true",
                   help="compile with Inductor and the block cache in the graph (threshold 0: every call computes)")
    args = p.parse_args(argv)
    # --inductor: a second call runs after the first has written the cache state
    options, calls = (INDUCTOR_OPTIONS, 2) if args.inductor else (OPTIONS, 1)
    if args.capture_dynamic:
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
        torch._dynamo.config.capture_scalar_outputs = True

    names = list(ZOO)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in ZOO]
        if unknown:
            p.error(f"not in ZOO: {', '.join(unknown)} (known: {', '.join(ZOO)})")

    meta = metadata(options)
    meta["calls"] = calls
    meta["capture_dynamic"] = bool(args.capture_dynamic)
    rows = []
    for i, name in enumerate(names, 1):
        row = run_one(name, options, calls)
        rows.append(row)
        status = "ok" if row["ok"] else ("FAILED" if row["error"] else "not ok")
        print(f"[{i}/{len(names)}] {name}: {status} ({row['seconds']}s) groups: {_groups_cell(row)}"
              + (f" diff {_diff_cell(row)}" if row["max_abs_diff"] is not None else "")
              + (f" | {row['error']}" if row["error"] else ""), flush=True)

    print()
    print(text_table(rows), flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "totals": totals(rows), "rows": rows}, f, indent=1)
            f.write("\n")
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(markdown_table(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
