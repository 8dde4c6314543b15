"""Kernel tests: CPU tier (Triton under the interpreter) and a ``gpu`` tier.

TRITON_INTERPRET must be set before any ``@triton.jit`` module is imported, so it is set here, at
conftest import, unless the caller chose a value. On a GPU machine run the GPU tier with
``TRITON_INTERPRET=0 pytest tests/kernels -m gpu`` (the interpreter would also run CUDA tensors);
the CPU-kernel tests then skip, saying why.
"""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

_triton_helpers = sys.modules.get("cdcompile.kernels._triton")
if _triton_helpers is not None and os.environ["TRITON_INTERPRET"] == "1" and not _triton_helpers.INTERPRETING:
    raise pytest.UsageError(
        "cdcompile.kernels was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1, so its "
        "Triton kernels cannot run on CPU; set TRITON_INTERPRET=1 in the environment or in the root conftest"
    )

from cdcompile.kernels import _triton  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device and compiled (not interpreted) Triton")
    config.addinivalue_line("markers", "interpreter: runs Triton kernels on CPU tensors (TRITON_INTERPRET=1)")


def pytest_collection_modifyitems(config, items):
    gpu_ok = torch.cuda.is_available() and _triton.HAS_TRITON and not _triton.INTERPRETING
    interp_ok = _triton.HAS_TRITON and _triton.INTERPRETING
    for item in items:
        if "gpu" in item.keywords and not gpu_ok:
            item.add_marker(pytest.mark.skip(reason="needs CUDA with TRITON_INTERPRET unset or 0"))
        if "interpreter" in item.keywords and not interp_ok:
            item.add_marker(pytest.mark.skip(reason="needs Triton with TRITON_INTERPRET=1 set before import"))
