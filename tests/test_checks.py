"""The argument checks the ops share (restv2_kernels.checks): what each call must refuse, with
the op and the argument named, and what it must let through. (tests/test_contracts.py: each op
and its reference refuse the same calls.)"""

import numpy as np
import pytest
import torch

from restv2_kernels.checks import check_eps, check_out_dtype, check_tensors, scale_value

X = torch.zeros(2, 3)
W = torch.zeros(3)


def test_accepts_tensors_and_left_out_optionals():
    check_tensors("op", (("x", X), ("weight", W), ("bias", None)), optional=("bias",))
    check_tensors("op", (("x", X), ("weight", W.double())), same_dtype=False)


@pytest.mark.parametrize(
    "named, optional, error, match",
    [
        pytest.param((("x", X), ("weight", None)), (), TypeError, "op: weight must be a torch.Tensor", id="required"),
        pytest.param((("x", None), ("weight", W)), ("weight",), TypeError, "op: x must be a torch.Tensor", id="first"),
        pytest.param((("x", X), ("weight", [1.0])), (), TypeError, "weight must be a torch.Tensor, got list", id="list"),
        pytest.param((("x", X.int()), ("weight", W)), (), TypeError, "op: x has dtype torch.int32", id="int"),
        pytest.param((("x", X), ("weight", W.half())), (), TypeError, "weight has dtype torch.float16, but x", id="mix"),
        pytest.param((("x", X), ("weight", W.to("meta"))), (), ValueError, "op: weight is on meta, but x is on cpu", id="device"),
    ],
)  # fmt: skip
def test_refuses_with_the_argument_named(named, optional, error, match):
    with pytest.raises(error, match=match):
        check_tensors("op", named, optional=optional)


def test_device_is_checked_without_same_dtype():
    with pytest.raises(ValueError, match="bias is on meta"):
        check_tensors("op", (("x", X), ("bias", W.half().to("meta"))), same_dtype=False)


def test_eps_is_a_non_negative_number():
    for eps in (0, 1e-6, 1e-5):
        check_eps("op", eps)
    for eps in (-1e-6, float("nan"), True, "1e-6", None):
        with pytest.raises(ValueError, match="op: eps must be a non-negative number"):
            check_eps("op", eps)


def test_scale_value_takes_numbers_and_detached_one_element_tensors():
    assert scale_value("op", None, 64) == 0.125
    for scale in (0.5, 1, np.float32(0.5), torch.tensor(0.5), torch.tensor([0.5], dtype=torch.float16)):
        assert scale_value("op", scale, 64) == float(scale)
    with torch.no_grad():  # no gradient is being recorded: a leaf that requires one is just a number here
        assert scale_value("op", torch.tensor(0.5, requires_grad=True), 64) == 0.5


@pytest.mark.parametrize(
    "scale, error, match",
    [
        pytest.param(float("inf"), ValueError, "op: scale must be finite, got inf", id="inf"),
        pytest.param(float("nan"), ValueError, "op: scale must be finite", id="nan"),
        pytest.param(True, TypeError, "op: scale must be a real number or None, got bool", id="bool"),
        pytest.param("0.5", TypeError, "op: scale must be a real number or None, got str", id="str"),
        pytest.param(torch.ones(2), TypeError, "one-element floating tensor, got a torch.float32 tensor of shape", id="2-elements"),
        pytest.param(torch.tensor(2), TypeError, "one-element floating tensor", id="int-tensor"),
        pytest.param(torch.tensor(0.5, requires_grad=True), ValueError, "op: scale is a constant", id="requires-grad"),
        pytest.param(torch.tensor(0.5, device="meta"), ValueError, "op: scale is a meta tensor", id="meta"),
    ],
)  # fmt: skip
def test_scale_value_refuses(scale, error, match):
    with pytest.raises(error, match=match):
        scale_value("op", scale, 64)


def test_out_dtype_is_none_or_floating():
    for out_dtype in (None, torch.float16, torch.bfloat16, torch.float32, torch.float64):
        check_out_dtype("op", out_dtype)
    for out_dtype in (torch.int32, torch.bool, "float32", float):
        with pytest.raises(TypeError, match="op: out_dtype must be a floating dtype or None"):
            check_out_dtype("op", out_dtype)
