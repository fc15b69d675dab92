"""torch.export: the model exports with the Triton kernels as custom ops in the graph (on the
test device: in Triton's interpreter on a CPU machine) and with the reference backend, at a fixed
size and with dynamic batch, height and width; the exported programs give the eager model's outputs."""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

from restv2 import ResT, ResTV2

MINI = dict(embed_dims=[16, 32, 64, 128], num_heads=[1, 2, 4, 8], depths=[1, 1, 1, 1], num_classes=10)
# Dynamic sides start at 33: at exactly 32 the reduced maps are 1x1, and export specialises sizes of 1.
DYNAMIC = {
    "x": {0: Dim("batch", min=1, max=512), 2: Dim("height", min=33, max=8192), 3: Dim("width", min=33, max=8192)}
}
KERNEL_OPS = {
    "add_layer_norm_fwd",
    "bias_relu_fwd",
    "emsa_attention_fwd",
    "linear_gelu_fwd",
    "pixel_attention_fwd",
    "upsample_add_fwd",
}


def _pair(cls, config):
    torch.manual_seed(0)
    model = cls(**config, backend="triton").eval()
    reference = cls(**config, backend="reference").eval()
    reference.load_state_dict(model.state_dict())
    return model, reference


@pytest.mark.parametrize(
    "cls, config, ops",
    [(ResTV2, MINI, KERNEL_OPS), (ResT, dict(MINI, qkv_bias=True), KERNEL_OPS - {"upsample_add_fwd"})],
    ids=["v2", "v1"],
)
def test_export_with_kernels(cls, config, ops, device):
    model, reference = (m.to(device) for m in _pair(cls, config))
    program = torch.export.export(model, (torch.randn(2, 3, 97, 131, device=device),), dynamic_shapes=DYNAMIC)
    in_graph = {n.target._opname for n in program.graph.nodes if str(n.target).startswith("restv2.")}
    assert in_graph == ops
    for shape in [(2, 3, 97, 131), (1, 3, 64, 80), (3, 3, 33, 47)]:
        x = torch.randn(*shape, device=device)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), reference(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "cls, config", [(ResTV2, MINI), (ResT, dict(MINI, qkv_bias=True, apply_transform=True))], ids=["v2", "v1-transform"]
)
def test_export_reference_dynamic_matches_eager_exactly(cls, config):
    """Sides that do not divide by 32 stay dynamic: the upsample crop is a gather under export,
    so the graph does not specialise on whether the upsampled map needs cropping."""
    _, reference = _pair(cls, config)
    program = torch.export.export(reference, (torch.randn(2, 3, 97, 131),), dynamic_shapes=DYNAMIC)
    for shape in [(1, 3, 224, 224), (2, 3, 33, 47), (1, 3, 100, 64)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            assert torch.equal(program.module()(x), reference(x)), shape


def test_export_fixed_size_32():
    _, reference = _pair(ResTV2, MINI)
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(reference, (x,))
    with torch.no_grad():
        assert torch.equal(program.module()(x), reference(x))
