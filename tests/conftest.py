"""Test setup: without a CUDA GPU, the Triton kernels run in Triton's CPU interpreter.

``TRITON_INTERPRET`` is read when a kernel is decorated, so it is set here, before any
test module imports the kernel files. With a GPU present the same tests run compiled. The
interpreter runs without its per-call cost of device functions (``interpreter_patch.py``: the
same results, tested bit for bit), and computes bf16 on the values, rounding as a GPU does
(``restv2_kernels.interpreter_bf16``, which every interpreted launch installs; tested against
torch's bf16 bit for bit): the ``bf16`` tests run there, and are skipped only where that patch
does not fit the installed Triton's interpreter. ``cuda`` tests (compiled Triton: Inductor,
CUDA graphs, TF32, int64 offsets) are skipped without CUDA.

fp32 means IEEE fp32 in every test: on a GPU, cuDNN runs fp32 convolutions in TF32 by default
(cuBLAS matmuls already default to IEEE), which would make the eager fp32 run that the parity
tests measure the kernels against (``helpers.assert_close``) a TF32-level yardstick. Tests of
the TF32 paths turn it on themselves and restore it.

Where the interpreter cannot run the kernels with the installed packages (no Triton, or one
before 3.6: ``restv2_kernels.backend.triton_problem``; Triton before 3.7 with NumPy 2.4 or
later: ``interpreter_problem``), the run stops at the start with that message instead of failing
every kernel test inside Triton.
"""

import os

import pytest
import torch

from restv2_kernels import interpreter_bf16

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    import interpreter_patch

    interpreter_patch.install()  # the same results: a fifth less of the suite's CPU time, then a tenth less
    interpreter_bf16.install()  # as every interpreted launch would: bf16 on the values, not the bits

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # pytest -n N: the workers share the cores, a share each
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
torch.backends.cudnn.allow_tf32 = False  # the legacy flag: torch 2.11 and 2.13 both take it, and it sets conv and RNN


def pytest_configure(config):
    if _xdist_load_by_default(config):
        config.option.dist = "worksteal"
    if torch.cuda.is_available():
        return
    from restv2_kernels.backend import interpreter_problem, triton_problem

    problem = triton_problem() or interpreter_problem()
    if problem:  # every kernel test would fail inside Triton: say why once, before any runs
        raise pytest.UsageError(f"the kernel tests run in Triton's CPU interpreter here, and {problem}")


def _xdist_load_by_default(config) -> bool:
    """``pytest -n N`` without ``--dist``: xdist's "load" queues a chunk of tests on each worker
    up front, so near the end one worker can hold several whole-model tests while the other has
    nothing left (on two cores, one worker sat idle for the last 375 s of a 913 s run).
    "worksteal" (xdist 3.2) lets an idle worker take half of a busy one's queue. An explicit
    ``--dist`` is kept."""
    if getattr(config.option, "dist", "no") != "load":
        return False
    if any(arg == "-d" or arg.startswith("--dist") for arg in config.invocation_params.args):
        return False
    try:
        from xdist.scheduler import WorkStealingScheduling  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (compiled Triton)")
    no_bf16 = pytest.mark.skip(
        reason="bf16 in the interpreter needs restv2_kernels.interpreter_bf16, which this Triton does not take"
    )
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
        elif item.get_closest_marker("bf16") and not interpreter_bf16.installed():
            item.add_marker(no_bf16)


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(params=["interpreter", "no-interpreter"])
def interpreter_on_and_off(request, monkeypatch) -> None:
    """CPU tensors with and without Triton's interpreter. Without it, as on a GPU machine, the
    launchers refuse CPU tensors: a test of argument errors on CPU tensors must see its own error
    first there too (argument checks come before the device check)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if request.param == "interpreter" else "0")
