"""The bench scripts run as ``python bench/X.py``, which puts bench/ first on ``sys.path``: a script
named like an installed package shadows it for every import after. (bench/kernels.py once hid the
``kernels`` package transformers requires, and every diffusers model failed to import in bench/.)"""

import importlib.util
import pathlib

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


def test_no_bench_script_shadows_an_installed_module():
    names = sorted(p.stem for p in BENCH.glob("*.py"))
    assert "zoo" in names and "speed" in names
    shadowed = [n for n in names if importlib.util.find_spec(n) is not None]
    assert not shadowed, f"bench scripts named like installed modules: {shadowed}; rename them"
