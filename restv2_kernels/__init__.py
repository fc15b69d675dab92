"""Fused Triton kernels for EMSAv2's hot path, each beside an eager reference.

- ``emsa_attention(q, k, v, scale=None)``: softmax attention of N queries over M reduced keys;
  ``emsa_attention_kv(q, kv, scale=None)`` the same on keys and values packed as the kv Linear
  writes them (one kv gradient, v's other gradient added inside the backward).
- ``emsa_attention_mixed(q, k, v, weight, bias, scale=None, eps=1e-5)``: ResTv1's attention with
  the heads' interaction (1x1 conv across the heads' scores, softmax, InstanceNorm).
- ``upsample_add(x, v, weight, bias, norm_weight, norm_bias, sr, eps=1e-6)``: the upsample
  branch (depthwise 3x3 conv + pixel-shuffle + crop + LayerNorm + residual add).
- ``add_layer_norm``, ``linear_gelu``, ``mlp``, ``pixel_attention``, ``bias_relu``: the residual
  add + LayerNorm (stochastic depth's per-sample factor on the branch included), the MLP with
  its GELU, PA, and the stems' folded-BatchNorm bias + ReLU.
- ``batch_norm_relu``: the stems' BatchNorm + ReLU in training (F.batch_norm's arguments).
- ``pixel_attention_layer_norm``: PA and the LayerNorm after it (stems, patch embeds), in one
  pass where no gradient is needed.

``restv2_kernels.reference`` holds the eager versions. Importing this package neither
imports Triton nor touches the GPU: the kernel modules load on first use.
"""

from __future__ import annotations

import importlib

from . import backend, reference

__all__ = [
    "emsa_attention",
    "emsa_attention_kv",
    "emsa_attention_mixed",
    "upsample_add",
    "add_layer_norm",
    "linear_gelu",
    "pixel_attention",
    "pixel_attention_layer_norm",
    "bias_relu",
    "batch_norm_relu",
    "mlp",
    "reference",
    "backend",
]

_LAZY = {
    "emsa_attention": "restv2_kernels.attention.triton",
    "emsa_attention_kv": "restv2_kernels.attention.triton",
    "emsa_attention_mixed": "restv2_kernels.attention_mixed.triton",
    "upsample_add": "restv2_kernels.upsample.triton",
    "add_layer_norm": "restv2_kernels.layernorm.triton",
    "linear_gelu": "restv2_kernels.ffn.triton",
    "mlp": "restv2_kernels.ffn.triton",
    "pixel_attention": "restv2_kernels.pa.triton",
    "pixel_attention_layer_norm": "restv2_kernels.pa.triton",
    "bias_relu": "restv2_kernels.bn_relu.triton",
    "batch_norm_relu": "restv2_kernels.bn_relu.triton",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups are plain attribute reads
        return value
    raise AttributeError(f"module 'restv2_kernels' has no attribute {name!r}")
