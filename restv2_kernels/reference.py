"""The eager references of every op, with the same signatures as the fused ones."""

from .attention.reference import emsa_attention, emsa_attention_kv
from .attention_mixed.reference import emsa_attention_mixed
from .bn_relu.reference import batch_norm_relu, bias_relu
from .ffn.reference import linear_gelu, mlp
from .layernorm.reference import add_layer_norm
from .pa.reference import pixel_attention, pixel_attention_layer_norm
from .upsample.reference import upsample_add

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
]
