"""torchvision detection: ``restv2.detection.fpn_backbone`` inside Faster R-CNN and Mask R-CNN,
a training step and an eval forward on the CPU, images of several sizes (sides not multiples of
32 included), frozen stages and BatchNorm kept in eval mode."""

from __future__ import annotations

import pytest
import torch
from helpers import require

require("torchvision")

from torchvision.models.detection import FasterRCNN, MaskRCNN  # noqa: E402

import restv2  # noqa: E402
from restv2.detection import BackboneWithFPN, fpn_backbone  # noqa: E402

SIZES = [(150, 211), (190, 170)]  # the detector's transform resizes within min_size/max_size


def _targets(masks: bool) -> list[dict[str, torch.Tensor]]:
    out = []
    for H, W in SIZES:
        t = dict(
            boxes=torch.tensor([[10.0, 20.0, 80.0, 90.0], [30.0, 15.0, 120.0, 140.0]]), labels=torch.tensor([1, 2])
        )
        if masks:
            m = torch.zeros(2, H, W, dtype=torch.uint8)
            m[0, 20:90, 10:80] = 1
            m[1, 15:140, 30:120] = 1
            t["masks"] = m
        out.append(t)
    return out


@pytest.mark.parametrize(
    "detector, name, trainable",
    [(FasterRCNN, "rest_lite", 4), (MaskRCNN, "restv2_tiny", 2)],
    ids=["faster_rcnn-rest_lite", "mask_rcnn-restv2_tiny"],
)
def test_detector_trains_and_predicts(detector, name, trainable):
    torch.manual_seed(0)
    backbone = fpn_backbone(name, trainable_stages=trainable, backend="reference")
    assert backbone.out_channels == 256
    model = detector(backbone, num_classes=3, min_size=160, max_size=256).train()
    images = [torch.rand(3, H, W) for H, W in SIZES]
    losses = model(images, _targets(masks=detector is MaskRCNN))
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()

    body = backbone.body
    for i, (embed, stage) in enumerate(zip(body._embeds(), body._stages())):
        grads = [p.grad for p in [*embed.parameters(), *stage.parameters()]]
        if i < 4 - trainable:  # frozen: no gradient, eval mode (no drop path, no batch statistics)
            assert all(g is None for g in grads) and not embed.training and not stage.training, f"stage {i}"
        else:
            assert all(g is not None and torch.isfinite(g).all() for g in grads), f"stage {i}"
            assert any(g.abs().sum() > 0 for g in grads), f"stage {i}"
    assert all(not m.training for m in body.modules() if isinstance(m, torch.nn.BatchNorm2d)), "norm_eval"

    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 97, 131), torch.rand(3, 200, 333)])
    assert len(out) == 2 and all(set(o) >= {"boxes", "labels", "scores"} for o in out)
    if detector is MaskRCNN:
        assert out[1]["masks"].shape[-2:] == (200, 333)


def test_backbone_maps_at_sizes_that_do_not_divide():
    """The detector's transform pads to multiples of 32; without it the maps still follow the
    input (ceil per stride-2 stage), and the detector still runs."""
    backbone = fpn_backbone("restv2_tiny", backend="reference").eval()
    with torch.no_grad():
        feats = backbone(torch.rand(1, 3, 97, 131))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(25, 33), (13, 17), (7, 9), (4, 5), (2, 3)]
    assert all(f.shape[1] == 256 for f in feats.values())
    model = FasterRCNN(backbone, num_classes=3, min_size=97, max_size=200).eval()
    model.transform.size_divisible = 1
    with torch.no_grad():
        assert len(model([torch.rand(3, 97, 131)])) == 1


def test_out_indices_prune_and_layer_norms():
    backbone = fpn_backbone("restv2_tiny", out_indices=(1, 2), backend="reference")
    assert backbone.body.num_stages == 3 and not hasattr(backbone.body, "stage4")
    assert [n for n, _ in backbone.named_children() if n.startswith("norm_")] == ["norm_2", "norm_3"]
    with torch.no_grad():
        feats = backbone.eval()(torch.rand(1, 3, 64, 64))
    assert list(feats) == ["0", "1", "pool"]
    plain = fpn_backbone("restv2_tiny", out_norm=False)
    assert not any(isinstance(m, torch.nn.LayerNorm) and n.startswith("norm_") for n, m in plain.named_children())


def test_norm_eval_off_trains_batchnorm_and_bad_arguments_raise():
    backbone = fpn_backbone("rest_lite", norm_eval=False).train()
    assert all(m.training for m in backbone.body.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with pytest.raises(ValueError, match="trainable_stages"):
        fpn_backbone("rest_lite", trainable_stages=5)
    with pytest.raises(ValueError, match="unknown model"):
        fpn_backbone("resnet50")
    with pytest.raises(TypeError, match="ResTV2 or ResT"):
        BackboneWithFPN(torch.nn.Conv2d(3, 8, 3))
    with pytest.raises(ValueError, match="by name"):
        fpn_backbone(restv2.rest_lite(), drop_path_rate=0.1)
