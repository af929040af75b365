"""Test setup. Triton's interpreter must be enabled before triton is imported (see fxfuse.config),
so this sets TRITON_INTERPRET first; tests opt in to running kernels with ``interpret``."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FXFUSE_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "fxfuse-kernels"))

import pytest  # noqa: E402
import torch  # noqa: E402

import fxfuse  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _inner_compiler(request):
    """The backend composes with Inductor by default, and Inductor's C++ compiles cost seconds on
    a CPU: tests about the backend's own behaviour (reports, options, capture, training) run its
    graphs op by op (inner="eager", the same graphs Inductor would get); the tests marked
    ``inductor`` (tests/test_backend_inductor.py) run the default composition. A test's own
    ``options={"inner": ...}`` wins either way. They keep the fused operators in training graphs
    (keep_operators: their autograd formulas are what a GPU runs); tests/test_cpu_training_forms.py
    checks the default, the forms Inductor gets."""
    if "inductor" in request.keywords:
        yield
        return
    with fxfuse.config.patch(inner="eager", keep_operators=True):
        yield


@pytest.fixture(params=["reference", "interpret"])
def cpu_path(request):
    """Run a test once on the exact torch reference and once on the Triton kernels (interpreted)."""
    with fxfuse.config.patch(interpret=request.param == "interpret"):
        yield request.param


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on the GPU machine (see benchmarks/README.md)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
