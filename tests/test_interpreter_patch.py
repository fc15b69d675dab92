"""tests/interpreter_patch.py, which conftest.py installs where the kernels run in Triton's
interpreter: every kernel computes bit for bit what it computes without it, with far fewer
patches of ``triton.language``, and the remembered dtype lookup answers as the original does."""

from __future__ import annotations

import interpreter_patch
import pytest
import torch

from restv2 import ResT, ResTV2

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the kernels run compiled where CUDA is present")

MINI = dict(embed_dims=[16, 32, 64, 128], num_heads=[1, 2, 4, 8], depths=[1, 1, 1, 1], num_classes=10)


def _logits_and_grads(cls, **config):
    """Training mode (the stems' BatchNorm kernels too), forward and backward through every
    kernel the model launches: ResTV2 the upsample branch, ResT the mixed attention."""
    torch.manual_seed(0)
    model = cls(**MINI, **config, backend="triton").train()
    x = torch.randn(1, 3, 33, 47)
    logits = model(x)
    logits.square().sum().backward()
    return [logits.detach()] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize(
    "cls, config", [(ResTV2, {}), (ResT, dict(apply_transform=True, qkv_bias=True))], ids=["ResTV2", "ResT"]
)
def test_kernels_compute_the_same_with_and_without_the_patch(cls, config):
    from triton.runtime import interpreter

    assert interpreter_patch.installed(), "conftest.py installs it where the interpreter runs"
    original = interpreter._patch_lang.restv2_original
    calls = []

    def counted(fn):
        calls.append(fn.__name__)
        return original(fn)

    interpreter_patch.uninstall()
    try:
        assert not hasattr(interpreter._get_np_dtype, "restv2_original"), "uninstall() restores the lookup"
        interpreter._patch_lang = counted
        plain = _logits_and_grads(cls, **config)
        plain_calls = len(calls)
        calls.clear()
        assert interpreter_patch.install()  # over the counting one
        patched = _logits_and_grads(cls, **config)
    finally:
        interpreter_patch.uninstall()
        interpreter._patch_lang = original
        interpreter_patch.install()

    assert len(plain) == len(patched)
    for i, (a, b) in enumerate(zip(plain, patched)):
        assert torch.equal(a, b), f"tensor {i} differs with the patch"
    assert len(calls) * 3 < plain_calls, (len(calls), plain_calls)


def _triton_types():
    """Every scalar type the interpreter stores, blocks of them, pointers to them and blocks of
    pointers, each type in several orders (the memory must not answer one with another's answer)."""
    import triton.language as tl

    scalars = [t for t in vars(tl).values() if isinstance(t, tl.dtype) and not isinstance(t, tl.pointer_type)]
    scalars = [t for t in scalars if t.name != "void"]
    types = []
    for t in scalars:
        types += [tl.block_type(t, [4]), t, tl.pointer_type(t), tl.block_type(tl.pointer_type(t), [2, 8])]
    return scalars, types


def test_remembered_dtype_lookup_answers_as_the_original():
    from triton.runtime import interpreter

    assert interpreter_patch.installed()
    original = interpreter._get_np_dtype.restv2_original
    scalars, types = _triton_types()
    assert len(scalars) >= 15, [t.name for t in scalars]  # int1 ... uint64, fp16/bf16/fp32/fp64, fp8s
    for order in (types, types[::-1]):
        fresh = interpreter_patch._remembered(original)
        for t in order:
            known = True
            try:
                expected = original(t)
            except KeyError:  # a type the interpreter does not store: the same error, not an answer
                known = False
            if known:
                assert fresh(t) == expected, t
                assert fresh(t) == expected, t  # and from memory
            else:
                with pytest.raises(KeyError):
                    fresh(t)
    answers = {original(t) for t in types if t.name in ("fp32", "bf16", "int1")}
    assert len(answers) == 3  # the lookup distinguishes them: the comparison above can fail
