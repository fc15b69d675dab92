"""ResTv2 and ResTv1 vision backbones, checkpoint-exact, with fused Triton kernels for EMSAv2.

    from restv2 import restv2_base
    model = restv2_base(checkpoint_path="restv2_base_224.pth").eval()

Every model takes ``backend=`` (``"auto"``, ``"triton"`` or ``"reference"``); see
``restv2_kernels.backend``. When timm is installed, the eight models are also registered with
timm (``timm.create_model("restv2_tiny")``, see ``restv2.timm_registry``).
"""

import importlib.util as _importlib_util
import warnings as _warnings

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
    "DROP_PATH",
]

MODELS = {
    f.__name__: f
    for f in (restv2_tiny, restv2_small, restv2_base, restv2_large, rest_lite, rest_small, rest_base, rest_large)
}

#: The stochastic-depth rate each model trains with (``drop_path_rate``; the factories default
#: to 0): what ``restv2.train`` uses and the benchmarks' training steps run with. restv2_tiny's
#: 0.1 is the published command's; ResTv1's are the ResTv1 release's commands;
#: restv2_small/base/large follow the paper's growth with size.
DROP_PATH = {
    "restv2_tiny": 0.1, "restv2_small": 0.2, "restv2_base": 0.3, "restv2_large": 0.5,
    "rest_lite": 0.1, "rest_small": 0.1, "rest_base": 0.2, "rest_large": 0.3,
}  # fmt: skip


def _register_with_timm() -> None:
    """Registers the models with timm when it is installed (timm is optional: without it,
    nothing is imported and ``import restv2`` stays fast)."""
    if _importlib_util.find_spec("timm") is None:
        return
    try:
        from . import timm_registry  # noqa: F401
    except Exception as e:  # a broken timm or torchvision must not break restv2 itself
        _warnings.warn(
            f"timm is installed but could not be imported ({type(e).__name__}: {e}); the restv2 models are not "
            "registered with timm. A torchvision built for another torch build is the usual cause.",
            stacklevel=2,
        )


_register_with_timm()
