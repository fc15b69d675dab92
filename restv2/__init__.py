"""ResTv2 and ResTv1 vision backbones, checkpoint-exact, with fused Triton kernels for EMSAv2.

    from restv2 import restv2_base
    model = restv2_base(checkpoint_path="restv2_base_224.pth").eval()

Every model takes ``backend=`` (``"auto"``, ``"triton"`` or ``"reference"``); see
``restv2_kernels.backend``.
"""

from .checkpoint import load_checkpoint
from .rest_v1 import ResT, rest_base, rest_large, rest_lite, rest_small
from .restv2 import ResTV2, restv2_base, restv2_large, restv2_small, restv2_tiny

__all__ = [
    "ResTV2",
    "ResT",
    "restv2_tiny",
    "restv2_small",
    "restv2_base",
    "restv2_large",
    "rest_lite",
    "rest_small",
    "rest_base",
    "rest_large",
    "load_checkpoint",
    "MODELS",
]

MODELS = {
    f.__name__: f
    for f in (restv2_tiny, restv2_small, restv2_base, restv2_large, rest_lite, rest_small, rest_base, rest_large)
}
