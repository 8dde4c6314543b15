"""Shared pieces of the benchmarks: run metadata, step timing, medians, tables and result files.

A benchmark builds rows (dicts), prints :func:`text_table` and hands rows plus :func:`metadata` to
:func:`write_results`, which writes ``<stem>.json`` and ``<stem>.md``. Times are medians of
repeats; callers alternate the configurations they compare (STYLE.md points 18-20).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Any, Callable, Iterable, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed
        return None


def metadata(device: str, **extra: Any) -> dict[str, Any]:
    """Device, versions, git commit and date of this run (plus ``extra``)."""
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD") or "unknown",
        # uncommitted changes to tracked files, or untracked files in the package: the commit
        # alone does not say what ran
        "git_dirty": bool(_git("status", "--porcelain", "--", "cdcompile")),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "cache_dit": _version("cache-dit"),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name()
        meta["cuda"] = torch.version.cuda
    meta.update(extra)
    return meta


def median(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return statistics.median(xs) if xs else None


class StepTimer:
    """Times each call of a request; on CUDA with events (no sync between steps)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def run(self, fn: Callable[[Any], Any], inputs: Sequence[Any]) -> tuple[float, list[float], list[Any]]:
        """Call ``fn`` on each input; returns (request seconds, per-call seconds, outputs)."""
        outs = []
        if self.cuda:
            torch.cuda.synchronize()
            events = [torch.cuda.Event(enable_timing=True) for _ in range(len(inputs) + 1)]
            t0 = time.perf_counter()
            events[0].record()
            for k, x in enumerate(inputs):
                outs.append(fn(x))
                events[k + 1].record()
            torch.cuda.synchronize()
            total = time.perf_counter() - t0
            steps = [events[k].elapsed_time(events[k + 1]) / 1e3 for k in range(len(inputs))]
            return total, steps, outs
        steps = []
        t0 = time.perf_counter()
        for x in inputs:
            s = time.perf_counter()
            outs.append(fn(x))
            steps.append(time.perf_counter() - s)
        return time.perf_counter() - t0, steps, outs


def fmt(v: Any, spec: str = ".1f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(header)] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(c, widths)))
             for c in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    esc = lambda v: fmt(v).replace("|", "\\|")  # noqa: E731  (a "|" in a cell would split it)
    lines = ["| " + " | ".join(esc(h) for h in header) + " |",
             "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(esc(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_results(stem: str, data: dict[str, Any], markdown: str) -> list[str]:
    """Write ``<stem>.json`` (``data``) and ``<stem>.md`` (``markdown``); returns the paths."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    paths = [stem + ".json", stem + ".md"]
    with open(paths[0], "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")
    with open(paths[1], "w") as f:
        f.write(markdown.rstrip() + "\n")
    return paths
