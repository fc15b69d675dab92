"""The argument checks the ops share (restv2_kernels.checks): what each call must refuse, with
the op and the argument named, and what it must let through."""

import pytest
import torch

from restv2_kernels.checks import check_eps, check_tensors

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
