import os

# One inductor cache for the whole suite (and across runs): cold inductor compiles are slow on 2 cores.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(__file__)), ".inductor-cache"))

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# Under pytest-xdist, each worker's torch takes its share of the cores: two workers with two
# intra-op threads each on two cores made the suite about 8% slower (oversubscribed OpenMP).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25)
settings.load_profile("ci")


# Files whose tests share results computed once per process (test_context_parallel's spawned ranks,
# the trained pipeline, the kernels' AOT compile): `make test` (-n 2 --dist loadgroup) gives each
# to one worker whole and schedules every other test on its own. pytest-xdist's own loadgroup reads
# xdist_group marks through a node id suffix that pytest 9 no longer takes, hence the scheduler.
WHOLE_FILES = {"tests/test_context_parallel.py", "tests/test_trained.py", "tests/kernels/test_kernels_aot.py"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class WholeFiles(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if path in WHOLE_FILES else super()._split_scope(nodeid)

    return WholeFiles(config, log)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test starts from empty Dynamo caches (instances of one class share compiled code)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
