"""timm: the eight models through ``timm.create_model``, held to timm's own model tests
(``tests/test_models.py`` of timm 1.0: forward, backward, default cfgs, features_only,
forward_intermediates), plus pretrained files, the data config and the error without a file."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import require

timm = require("timm")

import restv2  # noqa: E402  (registers the models with timm)
from restv2.pretrained import PRETRAINED_CFGS  # noqa: E402
from restv2.rest_v1 import ARCHS as V1_ARCHS  # noqa: E402
from restv2.restv2 import ARCHS as V2_ARCHS  # noqa: E402

ARCHS = {**V2_ARCHS, **V1_ARCHS}

NAMES = sorted(restv2.MODELS)
SMALL = 64  # timm's tests shrink inputs to a target size; stride 32 gives 2x2 final maps


def test_all_models_and_tags_registered():
    assert sorted(timm.list_models("rest*")) == NAMES
    for tag in PRETRAINED_CFGS:
        name = tag.split(".")[0]
        cfg = timm.models.get_pretrained_cfg(tag)
        assert cfg is not None and cfg.architecture == name, tag
        assert not cfg.url and not cfg.hf_hub_id, f"{tag}: no published URL or hub id exists"


@pytest.mark.parametrize("name", NAMES)
def test_timm_model_contract(name):
    """timm's test_model_backward, test_model_default_cfgs and test_model_forward_intermediates,
    on one model each."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=42, backend="reference")
    assert type(model) is (restv2.ResTV2 if name.startswith("restv2") else restv2.ResT)
    # backward (timm: batch 2, train mode, every parameter gets a gradient)
    model.train()
    out = model(torch.randn(2, 3, SMALL, SMALL))
    out.mean().backward()
    assert out.shape == (2, 42) and not torch.isnan(out).any()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {n}"

    # default cfgs
    model.eval()
    cfg = model.pretrained_cfg
    state_dict = model.state_dict()
    assert cfg["classifier"] + ".weight" in state_dict and cfg["first_conv"] + ".weight" in state_dict
    assert model.get_classifier() is model.head
    assert model.num_features == model.head_hidden_size == model.feature_info[-1]["num_chs"]
    x = torch.randn(1, *cfg["input_size"])
    with torch.no_grad():
        assert model.forward_features(x).shape[-2:] == cfg["pool_size"]
        x = torch.randn(1, 3, SMALL, SMALL)
        model.reset_classifier(0)
        assert model(x).shape == (1, model.num_features)
        model.reset_classifier(0, "")
        assert model(x).shape == (1, model.num_features, 2, 2)
        headless = timm.create_model(name, num_classes=0, global_pool="").eval()
        assert headless(x).shape == (1, model.num_features, 2, 2)

        # forward_intermediates
        final, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
        assert len(intermediates) == len(model.feature_info) == 4
        for info, t in zip(model.feature_info, intermediates):
            assert t.shape[1] == info["num_chs"]
            assert t.shape[2] <= math.ceil(SMALL / info["reduction"]) + 1
            assert not torch.isnan(t).any()
        torch.testing.assert_close(final, model.forward_features(x))
    model.set_grad_checkpointing()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_intermediates(x)[0], final, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["restv2_tiny", "rest_lite"])
@pytest.mark.parametrize("feature_cls", [None, "getter"])
def test_features_only(name, feature_cls):
    """timm's test_model_forward_features and test_model_forward_intermediates_features,
    at a size that does not divide by 32."""
    kwargs = {} if feature_cls is None else {"feature_cls": feature_cls}
    model = timm.create_model(name, features_only=True, **kwargs).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert channels == ARCHS[name]["embed_dims"] and reductions == [4, 8, 16, 32]
    size = (97, 131)
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    assert len(outs) == 4
    for c, r, o in zip(channels, reductions, outs):
        assert o.shape == (1, c, math.ceil(size[0] / r), math.ceil(size[1] / r))
        assert not torch.isnan(o).any()


def test_features_only_out_indices_prunes_the_model():
    model = timm.create_model("restv2_tiny", features_only=True, out_indices=(1, 2)).eval()
    assert model.feature_info.channels() == [192, 384]
    body = model.model
    assert body.num_stages == 3 and not hasattr(body, "stage4") and not hasattr(body, "patch_4")
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 96, 64))
    assert [tuple(o.shape) for o in outs] == [(2, 192, 12, 8), (2, 384, 6, 4)]


def _released_file(tmp_path, name, **kwargs):
    """A checkpoint written as the authors' training script does: weights under ``model``,
    saved from DistributedDataParallel (``module.`` prefix), beside optimizer state."""
    torch.manual_seed(1)
    src = restv2.MODELS[name](**kwargs).eval()
    path = tmp_path / f"{name}.pth"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 299}, path)
    return src, path


def test_pretrained_file_loads_exactly(tmp_path):
    src, path = _released_file(tmp_path, "rest_lite")
    model = timm.create_model("rest_lite", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), rtol=0, atol=0)


def test_pretrained_file_new_head_and_channels(tmp_path):
    src, path = _released_file(tmp_path, "restv2_tiny")
    overlay = dict(file=str(path))
    model = timm.create_model("restv2_tiny", pretrained=True, pretrained_cfg_overlay=overlay, num_classes=7)
    assert model.head.out_features == 7
    assert torch.equal(model.stage3[0].attn.q.weight, src.stage3[0].attn.q.weight)
    # one input channel: timm sums the first conv's weights over the RGB channels
    gray = timm.create_model("restv2_tiny", pretrained=True, pretrained_cfg_overlay=overlay, in_chans=1)
    torch.testing.assert_close(gray.stem.proj[0].weight, src.stem.proj[0].weight.sum(1, keepdim=True))
    feats = timm.create_model("restv2_tiny", pretrained=True, pretrained_cfg_overlay=overlay, features_only=True)
    assert torch.equal(feats.model.stage1[0].mlp.fc1.weight, src.stage1[0].mlp.fc1.weight)


def test_pretrained_without_a_file_raises():
    with pytest.raises(ValueError, match="pretrained_cfg_overlay=dict"):
        timm.create_model("restv2_tiny", pretrained=True)


@pytest.mark.parametrize(
    "tag, size, crop_pct, crop_mode, resize",
    [
        ("restv2_tiny", 224, 1.0, "center", 224),  # ResTv2 evaluation: resize 224, centre crop 224
        ("restv2_base.in1k_384", 384, 1.0, "squash", (384, 384)),  # resized to a square, no crop
        ("rest_small", 224, 0.875, "center", 256),  # ResTv1 evaluation: resize 256, centre crop 224
    ],
)
def test_data_config_is_the_official_evaluation(tag, size, crop_pct, crop_mode, resize):
    config = timm.data.resolve_data_config({}, model=timm.create_model(tag))
    assert config == dict(
        input_size=(3, size, size),
        interpolation="bicubic",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        crop_pct=crop_pct,
        crop_mode=crop_mode,
    )
    assert timm.data.create_transform(**config).transforms[0].size == resize


def test_backend_argument_reaches_every_layer():
    model = timm.create_model("restv2_tiny", backend="triton")
    assert model.backend == "triton"
    assert {m.backend for m in model.modules() if m is not model and hasattr(m, "backend")} == {"triton"}
