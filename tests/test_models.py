"""The reference model zoos: golden outputs, sizes, parameters, checkpoints, dense prediction."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import restv2
from restv2 import MODELS, ResT, ResTV2, load_checkpoint

DATA = Path(__file__).parent / "data"
OFFICIAL_KEYS = json.loads((DATA / "official_state_dict_keys.json").read_text())

# SPEC's tables: parameters (M, num_classes=1000) and GMACs of one 224x224 image.
SPEC_TABLE = {
    "restv2_tiny": (30.43, 4.08),
    "restv2_small": (41.21, 5.95),
    "restv2_base": (55.97, 7.86),
    "restv2_large": (86.53, 13.80),
    "rest_lite": (10.51, 1.53),
    "rest_small": (13.68, 2.09),
    "rest_base": (30.33, 4.63),
    "rest_large": (51.68, 8.36),
}

GOLDEN = {"restv2_mini": ResTV2, "restv2_mini_heads": ResTV2, "rest_v1_mini": ResT}
# Small configs for size tests: head dim 16, the real stage structure (sr 8, 4, 2, 1).
MINI_V2 = dict(embed_dims=[16, 32, 64, 128], num_heads=[1, 2, 4, 8], depths=[1, 1, 1, 1], num_classes=10)
MINI_V1 = dict(MINI_V2, qkv_bias=True, apply_transform=True)


def load_golden(name: str, dtype: torch.dtype):
    golden = torch.load(DATA / f"{name}.pt")
    model = GOLDEN[name](**golden["config"]).to(dtype).eval()
    load_checkpoint(model, {k: v.to(dtype) if v.is_floating_point() else v for k, v in golden["state_dict"].items()})
    return model, golden["cases"]


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


# ----------------------------------------------------------------------------- golden outputs


@pytest.mark.parametrize("name", list(GOLDEN))
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
def test_golden_logits(name, dtype, tol):
    model, cases = load_golden(name, dtype)
    for case in cases:
        with torch.no_grad():
            logits = model(case["input"].to(dtype))
        err = rel_error(logits, case["logits"])
        assert err < tol, f"{name} {tuple(case['input'].shape)} {dtype}: relative error {err:.2e} >= {tol:.0e}"


# ----------------------------------------------------------------------------- zoo structure


@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_matches_release_and_loads_strictly(name):
    model = MODELS[name]()
    own = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    official = [(k, shape) for k, shape in OFFICIAL_KEYS[name]]
    assert own == official
    # A state dict built from the official key list, with values that differ from the model's.
    state = {
        k: torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(shape)
        for k, shape in OFFICIAL_KEYS[name]
    }
    missing, unexpected = load_checkpoint(model, state, strict=True)
    assert missing == [] and unexpected == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("name", list(MODELS))
def test_params_and_gmacs_match_spec(name):
    from torch.utils.flop_counter import FlopCounterMode

    params_m, gmacs = SPEC_TABLE[name]
    with torch.device("meta"):
        model = MODELS[name]().eval()
        x = torch.empty(1, 3, 224, 224)
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6, 2) == params_m, f"{name}: {n} parameters"
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert round(counter.get_total_flops() / 2e9, 2) == gmacs


@pytest.mark.parametrize("name", list(MODELS))
def test_factories_take_constructor_kwargs(name):
    model = MODELS[name](num_classes=5, in_chans=1, drop_path_rate=0.1, backend="reference").eval()
    assert model.backend == "reference"
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 5)


def test_factories_are_exported():
    for name in SPEC_TABLE:
        assert callable(getattr(restv2, name))
    assert restv2.ResTV2 is ResTV2 and restv2.ResT is ResT


# ----------------------------------------------------------------------------- checkpoints


def _mini_state():
    model = ResTV2(**MINI_V2)
    return model, {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("wrapper", [None, "model", "state_dict", "model_ema", "module."])
def test_load_checkpoint_released_forms(wrapper, tmp_path):
    model, state = _mini_state()
    if wrapper == "module.":
        obj = {f"module.{k}": v for k, v in state.items()}
    elif wrapper is None:
        obj = state
    else:
        obj = {wrapper: state, "epoch": 300}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    for source in (obj, path, str(path)):
        fresh = ResTV2(**MINI_V2)
        load_checkpoint(fresh, source)
        assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())


def test_factory_checkpoint_path(tmp_path):
    model = restv2.restv2_tiny(num_classes=3)
    path = tmp_path / "tiny.pth"
    torch.save({"model": model.state_dict()}, path)
    loaded = restv2.restv2_tiny(num_classes=3, checkpoint_path=path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_load_checkpoint_mismatch_lists_keys():
    model, state = _mini_state()
    del state["stage1.0.attn.q.weight"]
    state["stage1.0.attn.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys:\n\s+stage1\.0\.attn\.q\.weight") as info:
        load_checkpoint(model, state)
    assert "unexpected keys" in str(info.value) and "stage1.0.attn.extra" in str(info.value)
    missing, unexpected = load_checkpoint(model, state, strict=False)
    assert missing == ["stage1.0.attn.q.weight"] and unexpected == ["stage1.0.attn.extra"]


def test_load_checkpoint_wrong_shape_and_wrong_model():
    model, state = _mini_state()
    state["head.weight"] = torch.zeros(3, 128)
    with pytest.raises(ValueError, match=r"head\.weight: checkpoint \(3, 128\) vs model \(10, 128\)"):
        load_checkpoint(model, state, strict=False)
    with pytest.raises(ValueError, match="missing keys"):
        load_checkpoint(ResT(**MINI_V1), _mini_state()[1])
    with pytest.raises(ValueError, match="no state dict found"):
        load_checkpoint(model, {"model": 3, "epoch": 1})


# ----------------------------------------------------------------------------- sizes


def _stage_sizes(H: int, W: int) -> list[tuple[int, int]]:
    sizes = []
    for _ in range(2):  # the stem: two stride-2 convs
        H, W = -(-H // 2), -(-W // 2)
    sizes.append((H, W))
    for _ in range(3):
        H, W = -(-H // 2), -(-W // 2)
        sizes.append((H, W))
    return sizes


@pytest.mark.parametrize("config", [MINI_V2, MINI_V1], ids=["v2", "v1"])
@pytest.mark.parametrize(
    "size", [(225, 225), (97, 131), (800, 1333), (32, 32), (33, 47)], ids=lambda s: f"{s[0]}x{s[1]}"
)
def test_any_size_forward_backward(config, size):
    cls = ResTV2 if "apply_transform" not in config else ResT
    # Eval mode so one image suffices (BatchNorm in training needs two); gradients still flow.
    model = cls(**config, backend="reference").eval()
    x = torch.randn(1, 3, *size, requires_grad=True)
    feats = model.forward_intermediates(x, intermediates_only=True)
    assert [tuple(f.shape[-2:]) for f in feats] == _stage_sizes(*size)
    loss = sum(f.float().square().mean() for f in feats) + model.forward_head(model.forward_features(x)).sum()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_full_width_odd_size_runs():
    model = restv2.restv2_tiny(backend="reference").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 225, 225)).shape == (1, 1000)


def test_sizes_divisible_by_32_match_published_reshapes():
    """Where the published code runs, every map is exactly H // stride and nothing is cropped."""
    model, cases = load_golden("restv2_mini", torch.float64)
    x = cases[1]["input"]  # 96x128
    feats = model.forward_intermediates(x, intermediates_only=True)
    assert [tuple(f.shape[-2:]) for f in feats] == [(96 // s, 128 // s) for s in (4, 8, 16, 32)]


@pytest.mark.parametrize(
    "shape, match",
    [
        ((3, 64, 64), "4-D"),
        ((1, 1, 3, 64, 64), "4-D"),
        ((1, 4, 64, 64), "3 input channels"),
        ((1, 3, 31, 64), "at least 32x32"),
        ((1, 3, 64, 16), "at least 32x32"),
    ],
)
def test_bad_input_raises(shape, match):
    model = ResTV2(**MINI_V2)
    for fn in (model, model.forward_features, model.forward_intermediates):
        with pytest.raises(ValueError, match=match):
            fn(torch.randn(*shape))


@pytest.mark.parametrize(
    "x, error, match",
    [
        pytest.param(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), TypeError, "floating-point image batch, got torch.uint8", id="uint8"),
        pytest.param(torch.zeros(1, 3, 64, 64, dtype=torch.complex64), TypeError, "floating-point image batch", id="complex"),
        pytest.param(torch.zeros(1, 3, 64, 64).half(), TypeError, "batch is torch.float16, but the model's parameters are torch.float32", id="fp16"),
        pytest.param(torch.zeros(1, 3, 64, 64).double(), TypeError, "batch is torch.float64, but", id="fp64"),
        pytest.param(torch.zeros(1, 3, 64, 64, device="meta"), ValueError, "batch is on meta, but the model is on cpu", id="device"),
    ],
)  # fmt: skip
def test_input_the_model_cannot_take_raises(x, error, match):
    """The dtype and device the stem's conv needs are checked before it runs (PyTorch's own
    errors, from inside the conv, say "expected scalar type Byte but found Float")."""
    for cls, config in ((ResTV2, MINI_V2), (ResT, MINI_V1)):
        model = cls(**config)
        for fn in (model, model.forward_features, model.forward_intermediates):
            with pytest.raises(error, match=match):
                fn(x)


def test_autocast_takes_an_input_in_another_dtype():
    """Under autocast the conv casts its input: a bf16 batch into an fp32 model is no error."""
    model = ResTV2(**MINI_V2).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x.bfloat16())
    assert out.shape == (1, 10) and out.isfinite().all()


# ----------------------------------------------------------------------------- training behaviour


@pytest.mark.parametrize("config", [MINI_V2, MINI_V1], ids=["v2", "v1"])
def test_every_parameter_gets_a_gradient(config):
    cls = ResTV2 if "apply_transform" not in config else ResT
    torch.manual_seed(0)
    model = cls(**config).train()
    # Non-zero biases and norm shifts so no gradient is zero by symmetry.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_drop_path_train_vs_eval():
    torch.manual_seed(0)
    model = ResTV2(**MINI_V2, drop_path_rate=0.5)
    rates = [getattr(blk.drop_path, "drop_prob", 0.0) for stage in model._stages() for blk in stage]
    assert rates == pytest.approx(torch.linspace(0, 0.5, 4).tolist())
    x = torch.randn(4, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
        no_drop = ResTV2(**MINI_V2).eval()
        no_drop.load_state_dict(model.state_dict())
        c = no_drop(x)
    assert torch.equal(a, b) and torch.equal(a, c), "eval mode must be deterministic and drop nothing"
    model.train()
    for m in model.modules():  # keep BatchNorm statistics out of the comparison
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        d = model(x)
        torch.manual_seed(2)
        e = model(x)
    assert not torch.equal(d, e), "drop path in training mode must be random"


def test_batchnorm_running_stats_update_only_in_training():
    model = ResTV2(**MINI_V2)
    bn = model.stem.proj[1]
    before = bn.running_mean.clone()
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert torch.equal(bn.running_mean, before)
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert not torch.equal(bn.running_mean, before)


# ----------------------------------------------------------------------------- dense prediction


@pytest.mark.parametrize("cls, config", [(ResTV2, MINI_V2), (ResT, MINI_V1)], ids=["v2", "v1"])
def test_dense_prediction_api(cls, config):
    model = cls(**config).eval()
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        feats = model.forward_intermediates(x, intermediates_only=True)
        final = model.forward_features(x)
        logits = model(x)
    assert len(feats) == 4
    for f, info in zip(feats, model.feature_info):
        assert f.shape == (2, info["num_chs"], 96 // info["reduction"], 160 // info["reduction"])
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]
    assert [i["num_chs"] for i in model.feature_info] == config["embed_dims"]
    # forward_features is the normalised stage-4 map; forward is features then head.
    expected = model.norm(feats[3].flatten(2).transpose(1, 2)).transpose(1, 2).reshape(final.shape)
    torch.testing.assert_close(final, expected)
    torch.testing.assert_close(logits, model.forward_head(final))
    torch.testing.assert_close(model.forward_head(final, pre_logits=True), final.mean((2, 3)))
    with torch.no_grad():
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        first = model.forward_intermediates(x, indices=[0], intermediates_only=True)
    assert [f.shape for f in last_two] == [f.shape for f in feats[2:]]
    torch.testing.assert_close(first[0], feats[0])


def test_headless_backbone():
    model = ResTV2(**{**MINI_V2, "num_classes": 0}).eval()
    assert isinstance(model.head, torch.nn.Identity)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 128)
    model.reset_classifier(4)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)


# ----------------------------------------------------------------------------- timm's model contract


@pytest.mark.parametrize("cls, config", [(ResTV2, MINI_V2), (ResT, MINI_V1)], ids=["v2", "v1"])
def test_forward_intermediates_timm_signature(cls, config):
    model = cls(**config).eval()
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        # norm=True: stage 4's map through the final norm, i.e. forward_features
        _, normed = model.forward_intermediates(x, indices=[-1], norm=True)
        torch.testing.assert_close(normed[0], final, rtol=0, atol=0)
        nhwc = model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
        for a, b in zip(maps, nhwc):
            assert torch.equal(a.permute(0, 2, 3, 1), b)
        # stop_early: the last map asked for is also the returned final map
        last, (stage2,) = model.forward_intermediates(x, indices=[1], stop_early=True)
        assert torch.equal(last, stage2) and torch.equal(stage2, maps[1])
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NLC")
    with pytest.raises(ValueError, match="indices"):
        model.forward_intermediates(x, indices=5)


@pytest.mark.parametrize("cls, config", [(ResTV2, MINI_V2), (ResT, MINI_V1)], ids=["v2", "v1"])
def test_prune_intermediate_layers(cls, config):
    model = cls(**config).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
    assert model.prune_intermediate_layers([-3, 0]) == [0, 1]
    assert model.num_stages == 2 and not hasattr(model, "stage3") and not hasattr(model, model.embed_names[2])
    assert not any(k.startswith(("stage3", "stage4", "norm.", "head.")) for k in model.state_dict())
    with torch.no_grad():
        stage1, stage2 = model.forward_intermediates(x, intermediates_only=True)
        torch.testing.assert_close(stage1, maps[0], rtol=0, atol=0)
        torch.testing.assert_close(stage2, maps[1], rtol=0, atol=0)
        torch.testing.assert_close(model(x), maps[1], rtol=0, atol=0)  # no norm, no pooling, no head


def test_global_pool_and_classifier_arguments():
    model = ResTV2(**{**MINI_V2, "num_classes": 0, "global_pool": ""}).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 128, 2, 2)
    assert model.head_hidden_size == model.num_features == 128
    with pytest.raises(ValueError, match="needs num_classes=0"):
        model.reset_classifier(5)
    model.reset_classifier(5, "avg")
    assert model.global_pool == "avg" and model.head.out_features == 5
    with pytest.raises(ValueError, match="global_pool must be"):
        ResTV2(**MINI_V2, global_pool="max")
    with pytest.raises(ValueError, match="needs num_classes=0"):
        ResTV2(**MINI_V2, global_pool="")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_grad_checkpointing_gives_the_same_gradients(backend, device):
    """Bit for bit on the CPU. On a GPU, cuDNN's weight-gradient convolutions may sum in another
    order from run to run (atomics), so there the check is fp32-close: a different drop-path mask
    would still be far off."""
    torch.manual_seed(0)
    model = ResTV2(**MINI_V2, drop_path_rate=0.3, backend=backend).to(device).train()
    x = torch.randn(2, 3, 64, 64, device=device)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(1)  # the same drop-path masks; checkpoint replays the RNG state
        model(x).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    exact = {"rtol": 0, "atol": 0} if device == "cpu" else {}
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], **exact, msg=name)


def test_factories_document_their_arguments():
    for factory in MODELS.values():
        assert "checkpoint_path:" in factory.__doc__ and "backend" in factory.__doc__, factory.__name__


def test_import_without_timm_imports_nothing_optional(tmp_path):
    """Without timm nothing optional is imported; a timm that fails to import (a torchvision
    built for another torch) gives a warning, and restv2 still works. timm is hidden where it is
    installed (``sys.modules["timm"] = None`` reads as not installed)."""
    check = (
        "import sys\nsys.modules['timm'] = None\nimport restv2\n"
        "assert not {'torchvision', 'triton'} & set(sys.modules), sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", check], check=True)
    broken = tmp_path / "timm"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import restv2\n"
        "assert any('torchvision::nms' in str(x.message) for x in w), [str(x.message) for x in w]\n"
        "assert restv2.rest_lite(num_classes=2).num_classes == 2\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})


def test_detection_without_torchvision_says_how_to_install():
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here (tests/integrations/test_detection.py covers it)")
    with pytest.raises(ImportError, match=r"restv2\[detection\]"):
        import restv2.detection  # noqa: F401
