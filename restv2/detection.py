"""ResT backbones for torchvision's detectors (Faster R-CNN, Mask R-CNN, RetinaNet, ...).

    from torchvision.models.detection import MaskRCNN
    from restv2.detection import fpn_backbone

    backbone = fpn_backbone("restv2_small", checkpoint_path="restv2_small_224.pth")
    model = MaskRCNN(backbone, num_classes=91)

Needs torchvision (``pip install "restv2[detection]"``). The backbone is the model's
``forward_intermediates`` (any input of at least 32x32, sides need not divide by 32), each stage
map through a channels-first LayerNorm as the authors' detection backbones do (``norm_1`` ..
``norm_4``), then torchvision's ``FeaturePyramidNetwork`` with ``LastLevelMaxPool``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool
except ImportError as e:  # torchvision is an optional dependency
    raise ImportError(
        f'restv2.detection needs torchvision ({e}); install it with `pip install "restv2[detection]"` '
        "(a torchvision built for your torch: for a CPU build of torch, from PyTorch's CPU index)"
    ) from e

from . import MODELS
from .backbone import Backbone


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map (on a channels-last map, no copy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class BackboneWithFPN(nn.Module):
    """A ResT model's stage maps through a feature pyramid: what torchvision's detectors take.

    ``forward(images)`` returns an ``OrderedDict`` of [B, out_channels, H_i, W_i] maps, keyed
    ``"0"``, ``"1"``, ... in the order of ``out_indices`` (then ``"pool"`` from
    ``LastLevelMaxPool``), as torchvision's own ``BackboneWithFPN``. ``out_channels`` is the
    attribute the detectors read.

    Args:
        body: a ``ResTV2`` or ``ResT``; its stages after the last of ``out_indices``, its final
            norm and its head are removed.
        out_indices: the stages to use (0 = stride 4, ..., 3 = stride 32).
        out_channels: the pyramid's width.
        extra_blocks: torchvision's extra pyramid levels (default ``LastLevelMaxPool()``).
        trainable_stages: how many stages, counted from the last, keep training (0-4, as
            torchvision's ``trainable_layers``): the others, stem included, are frozen
            (``requires_grad=False`` and kept in eval mode).
        norm_eval: keep every BatchNorm in eval mode (running statistics, not batch ones) while
            training, as detection recipes with small per-GPU batches do.
        out_norm: a LayerNorm on each stage map before the pyramid, as the authors' detection
            backbones have.
    """

    def __init__(
        self,
        body: Backbone,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        out_channels: int = 256,
        extra_blocks: ExtraFPNBlock | None = None,
        trainable_stages: int = 4,
        norm_eval: bool = True,
        out_norm: bool = True,
    ):
        super().__init__()
        if not isinstance(body, Backbone):
            raise TypeError(f"body must be a restv2 ResTV2 or ResT model, got {type(body).__name__}")
        if (
            isinstance(trainable_stages, bool)
            or not isinstance(trainable_stages, int)
            or not 0 <= trainable_stages <= 4
        ):
            raise ValueError(f"trainable_stages must be an int from 0 to 4, got {trainable_stages!r}")
        self.out_indices = body.prune_intermediate_layers(list(out_indices), prune_norm=True, prune_head=True)
        self.body = body
        in_channels = [body.embed_dims[i] for i in self.out_indices]
        for i, c in zip(self.out_indices, in_channels):
            self.add_module(f"norm_{i + 1}", LayerNorm2d(c, eps=1e-6) if out_norm else nn.Identity())
        self.fpn = FeaturePyramidNetwork(
            in_channels, out_channels, extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks
        )
        self.out_channels = out_channels
        self.trainable_stages = trainable_stages
        self.norm_eval = norm_eval
        for module in self._frozen():
            module.requires_grad_(False)
        self.train()

    def _frozen(self) -> list[nn.Module]:
        """The stem and the first ``4 - trainable_stages`` stages (each its embed and blocks)."""
        frozen = range(min(4 - self.trainable_stages, self.body.num_stages))
        return [m for i in frozen for m in (self.body._embeds()[i], self.body._stages()[i])]

    def train(self, mode: bool = True) -> BackboneWithFPN:
        super().train(mode)
        if mode:
            for module in self._frozen():
                module.eval()
            if self.norm_eval:
                for module in self.body.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.body.forward_intermediates(x, self.out_indices, intermediates_only=True)
        feats = OrderedDict(
            (str(j), getattr(self, f"norm_{i + 1}")(m)) for j, (i, m) in enumerate(zip(self.out_indices, maps))
        )
        return self.fpn(feats)


def fpn_backbone(
    model: str | Backbone,
    checkpoint_path: str | os.PathLike | None = None,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    out_channels: int = 256,
    extra_blocks: ExtraFPNBlock | None = None,
    trainable_stages: int = 4,
    norm_eval: bool = True,
    out_norm: bool = True,
    **model_kwargs,
) -> BackboneWithFPN:
    """A ResT backbone with a feature pyramid for torchvision's detectors.

    Args:
        model: a model name (``"restv2_tiny"``, ..., ``"rest_large"``) or a built model.
        checkpoint_path: a released ImageNet checkpoint to start from (with a name).
        out_indices, out_channels, extra_blocks, trainable_stages, norm_eval, out_norm: see
            ``BackboneWithFPN``.
        **model_kwargs: for the model built from a name, e.g. ``drop_path_rate`` (the authors
            use 0.1 / 0.2 / 0.3 / 0.5 for ResTv2 T / S / B / L in detection) and ``backend``.

    With ``out_indices`` other than all four stages, give the detector a matching
    ``MultiScaleRoIAlign(featmap_names=...)``: its default reads maps ``"0"`` to ``"3"``.
    """
    if isinstance(model, str):
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; choose from {sorted(MODELS)}")
        # the checkpoint's classifier is loaded, then removed with the head
        model = MODELS[model](checkpoint_path=checkpoint_path, **model_kwargs)
    elif checkpoint_path is not None or model_kwargs:
        raise ValueError("checkpoint_path and model arguments apply to a model given by name, not to a built model")
    return BackboneWithFPN(model, out_indices, out_channels, extra_blocks, trainable_stages, norm_eval, out_norm)
