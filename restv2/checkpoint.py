"""Loading the authors' released checkpoints."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn as nn

# Where released files keep the weights, in the order looked for.
_WRAPPER_KEYS = ("model", "state_dict", "model_ema")


def unwrap_state_dict(obj: Mapping) -> dict[str, torch.Tensor]:
    """The state dict inside a released file: bare, or under ``model``, ``state_dict`` or
    ``model_ema``. A ``module.`` prefix (saved from DistributedDataParallel) is dropped."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state dict or a checkpoint dict, got {type(obj).__name__}")
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = ", ".join(sorted(str(k) for k in obj)[:8])
        raise ValueError(
            f"no state dict found: expected tensors, or a dict under one of {_WRAPPER_KEYS}; top-level keys: {found}"
        )
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def load_checkpoint(
    model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping, strict: bool = True
) -> tuple[list[str], list[str]]:
    """Loads a released checkpoint (a file path or an already loaded dict) into ``model``.

    Returns ``(missing_keys, unexpected_keys)``, both empty when ``strict``. Raises ValueError
    listing every missing, unexpected and wrongly shaped key when they do not match (with
    ``strict=False``, only wrong shapes raise).
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        obj = torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
    else:
        obj = path_or_state_dict
    state_dict = unwrap_state_dict(obj)

    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if wrong_shape or (strict and (missing or unexpected)):
        lines = [f"checkpoint does not match {type(model).__name__}:"]
        for title, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", wrong_shape),
        ):
            if keys and (strict or title == "shape mismatches"):
                lines.append(f"  {len(keys)} {title}:")
                lines.extend(f"    {k}" for k in keys)
        raise ValueError("\n".join(lines))
    model.load_state_dict(state_dict, strict=strict)
    return missing, unexpected
