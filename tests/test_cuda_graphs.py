"""The kernel path under CUDA graphs: a captured inference forward, or a captured training
forward + backward, replayed on new inputs gives what the same model gives eagerly on them; and
torch.compile's ``mode="reduce-overhead"`` (Inductor's CUDA graph trees) runs the kernel path as
graphs, with no op making it skip them.

A kernel launch that synchronised with the host, allocated outside the graph's memory pool, read
at launch a host value that changes between replays, or launched on a stream other than the
current one would fail the capture or make a replay disagree with eager. CUDA graphs exist only
on CUDA: every test here carries the cuda marker. Each replay is also checked against the
previous input's: a replay that left its outputs as they were fails (``_changed``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from restv2 import ResT, ResTV2

pytestmark = pytest.mark.cuda

MINI_V2 = dict(embed_dims=[16, 32, 64, 128], num_heads=[1, 2, 4, 8], depths=[1, 1, 1, 1], num_classes=10)
MODELS = [
    pytest.param(ResTV2, {}, id="ResTV2"),
    pytest.param(ResT, dict(apply_transform=True, qkv_bias=True), id="ResT"),  # emsa_attention_mixed
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16-autocast")]
SHAPE = (2, 3, 97, 131)  # sides that do not divide by 32: padded patch embeds, ragged kernel tiles
# A replay runs the same kernels as eager on the same input, and this package's kernels are
# deterministic (no atomics): only a library's choice of algorithm could differ. Relative to the
# result's largest magnitude.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
REPLAYS = 2


def _autocast(dtype: torch.dtype):
    # a captured region may not use autocast's weight-cast cache (torch.cuda.graphs)
    enabled = dtype != torch.float32
    return torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False)


def _capture(fn, before_capture=None, warmup: int = 3):
    """A CUDA graph of ``fn()`` and its static output, after ``warmup`` calls on a side stream
    (the first calls compile and load the kernels, which a capture may not do)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    if before_capture is not None:
        before_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _close(name: str, got: torch.Tensor, eager: torch.Tensor, tol: float) -> None:
    """``got`` (a replay's result) within ``tol`` of ``eager`` (the same input's, eagerly),
    relative to eager's largest magnitude."""
    got, eager = got.detach().double(), eager.detach().double()
    err = (got - eager).abs().max().item() / max(eager.abs().max().item(), 1e-30)
    assert err <= tol, f"{name}: replay differs from eager by {err:.2e} (relative; tolerance {tol:.0e})"


def _changed(name: str, new: list[torch.Tensor], old: list[torch.Tensor], tol: float) -> None:
    """The new input's results differ from the previous input's by far more than ``tol`` somewhere
    (relative, per tensor): a replay that left its outputs as they were cannot pass ``_close``."""
    gap = max((n.double() - o.double()).abs().max().item() / max(n.abs().max().item(), 1e-30) for n, o in zip(new, old))
    assert gap > 10 * tol, f"{name}: the new input changes the results by only {gap:.2e} (relative): no test"


def _inputs(seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(SHAPE, device="cuda", generator=g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls, extra", MODELS)
def test_captured_inference_replays_like_eager(cls, extra, dtype):
    """Eval mode without gradients: BatchNorm folded into the stems (``bias_relu``), PA + LayerNorm
    in one kernel, attention, the upsample branch, add + LayerNorm, linear + GELU."""
    torch.manual_seed(0)
    model = cls(**MINI_V2, **extra, backend="triton").cuda().eval()
    static_x = _inputs(0)

    def forward() -> torch.Tensor:
        with torch.no_grad(), _autocast(dtype):
            return model(static_x)

    graph, static_out = _capture(forward)
    stale = forward()
    for seed in range(1, REPLAYS + 1):
        static_x.copy_(_inputs(seed))
        graph.replay()
        got = static_out.clone()
        eager = forward()
        _changed(f"logits, input {seed}", [eager], [stale], TOL[dtype])
        _close(f"logits, input {seed}", got, eager, TOL[dtype])
        stale = eager


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls, extra", MODELS)
def test_captured_training_step_replays_like_eager(cls, extra, dtype):
    """Training mode, forward + cross-entropy + backward captured whole (the stems' BatchNorm on
    batch statistics, every kernel's backward): the replay's loss and every parameter's gradient
    as eager's on the same input and labels."""
    torch.manual_seed(0)
    model = cls(**MINI_V2, **extra, backend="triton").cuda().train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    static_x = _inputs(0)
    static_y = torch.zeros(SHAPE[0], dtype=torch.long, device="cuda")

    def step() -> torch.Tensor:
        with _autocast(dtype):
            loss = F.cross_entropy(model(static_x).float(), static_y)
        loss.backward()
        return loss.detach()

    def eager_step() -> list[torch.Tensor]:
        """[loss, gradients...] of an eager step, into new tensors (the graph's stay as they are)."""
        saved = [p.grad for _, p in named]
        for _, p in named:
            p.grad = None
        loss = step()
        out = [loss] + [p.grad for _, p in named]
        for (_, p), g in zip(named, saved):
            p.grad = g
        return out

    # the graph allocates the gradients itself (set_to_none before the capture); a replay
    # overwrites them
    graph, static_loss = _capture(step, before_capture=lambda: model.zero_grad(set_to_none=True))
    static_out = [static_loss] + [p.grad for _, p in named]
    assert all(g is not None for g in static_out)
    names = ["loss"] + [f"{n}.grad" for n, _ in named]
    stale = eager_step()
    for seed in range(1, REPLAYS + 1):
        static_x.copy_(_inputs(seed))
        static_y.copy_(torch.arange(SHAPE[0], device="cuda") * seed % MINI_V2["num_classes"])
        graph.replay()
        got = [t.clone() for t in static_out]
        eager = eager_step()
        _changed(f"loss and gradients, input {seed}", eager, stale, TOL[dtype])
        for name, g, e in zip(names, got, eager):
            _close(f"{name}, input {seed}", g, e, TOL[dtype])
        stale = eager


@pytest.mark.inductor
def test_reduce_overhead_compile_runs_as_cuda_graphs():
    """``torch.compile(mode="reduce-overhead")`` in bf16 autocast: no op of the kernel path makes
    Inductor skip CUDA graphs (a custom op with a CPU tensor or a mutated input would), and each
    call's logits are eager's within the tolerance of the compile test in test_model_kernels.py
    (Inductor fuses the ops around the kernels differently from eager)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = ResTV2(**MINI_V2, backend="triton").cuda().eval()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    stale = None
    with torch.no_grad(), _autocast(torch.bfloat16):
        for seed in range(4):  # CUDA graph trees warm up, record, then replay
            x = _inputs(seed)
            got = compiled(x).clone()  # a later replay overwrites the graph's output
            eager = model(x)
            if stale is not None:
                _changed(f"logits, call {seed}", [eager], [stale], 2e-2)
            _close(f"logits, call {seed}", got, eager, 2e-2)
            stale = eager
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
