"""What the released checkpoints expect: preprocessing and file layout, as timm's pretrained cfgs.

Plain dicts (no timm needed); ``restv2.timm_registry`` registers them with timm. The values are
those of the authors' evaluation code (github.com/wofmanaf/ResT):

- ResTv2 (``main.py``/``datasets.py`` of the ResTv2 release): ImageNet mean and std, bicubic;
  at 224 ``--crop_pct`` defaults to 1.0 (resize the short side to 224, centre crop 224); at 384
  and above the image is resized to a square without cropping (timm's ``crop_mode="squash"``).
- ResTv1 (the ResTv1 release's ``datasets.py``): resize the short side to 256 (bicubic), centre
  crop 224, i.e. ``crop_pct`` 0.875.

The weights are published on Baidu Pan and Google Drive, which cannot be downloaded by a
program, so no cfg has a URL or hub id: download a file by hand and pass its path
(``checkpoint_path=`` to the factories, ``pretrained_cfg_overlay=dict(file=...)`` to timm).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .checkpoint import unwrap_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ORIGIN_URL = "https://github.com/wofmanaf/ResT"


def _cfg(first_conv: str, paper: str, size: int = 224, crop_pct: float = 1.0, crop_mode: str = "center") -> dict:
    return dict(
        url="",
        num_classes=1000,
        input_size=(3, size, size),
        min_input_size=(3, 32, 32),
        pool_size=(size // 32, size // 32),
        crop_pct=crop_pct,
        crop_mode=crop_mode,
        interpolation="bicubic",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        first_conv=first_conv,
        classifier="head",
        license="apache-2.0",
        origin_url=ORIGIN_URL,
        paper_ids=paper,
    )


_V2 = dict(first_conv="stem.proj.0", paper="arXiv:2204.07366")
_V1 = dict(first_conv="stem.conv1", paper="arXiv:2105.13677")

#: ``"model.tag"`` -> cfg, one per released checkpoint; the first tag of a model is its default.
PRETRAINED_CFGS: dict[str, dict] = {
    **{
        f"restv2_{size}.{tag}": cfg
        for size in ("tiny", "small", "base", "large")
        for tag, cfg in (("in1k", _cfg(**_V2)), ("in1k_384", _cfg(**_V2, size=384, crop_mode="squash")))
    },
    **{f"rest_{size}.in1k": _cfg(**_V1, crop_pct=0.875) for size in ("lite", "small", "base", "large")},
}


def checkpoint_filter_fn(state_dict: Mapping, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """A released file's contents as this package's state dict: the weights under ``model``,
    ``state_dict`` or ``model_ema`` (or bare), without DistributedDataParallel's ``module.``
    prefix. The keys are already the released ones (``load_checkpoint`` checks them)."""
    return unwrap_state_dict(state_dict)
