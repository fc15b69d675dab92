"""The eight models in timm's registry: ``timm.create_model("restv2_tiny", ...)``.

``import restv2`` imports this module when timm is installed (timm >= 1.0). Each entrypoint
builds through ``timm.models.build_model_with_cfg``, so timm's arguments work as for its own
models: ``pretrained=True`` with ``pretrained_cfg_overlay=dict(file=...)``, ``features_only=True``
with ``out_indices`` (timm's ``FeatureGetterNet`` over ``forward_intermediates``),
``num_classes``, ``in_chans`` (the first conv adapted from a 3-channel checkpoint),
``global_pool``, ``drop_path_rate`` and this package's ``backend``. The pretrained cfgs (tags
``.in1k`` and, for ResTv2, ``.in1k_384``) carry the authors' evaluation preprocessing, for
``timm.data.resolve_data_config``; see ``restv2.pretrained``.
"""

from __future__ import annotations

from collections.abc import Callable

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg

from . import rest_v1, restv2
from .backbone import Backbone
from .pretrained import PRETRAINED_CFGS, checkpoint_filter_fn

# register_model reads the cfgs from the entrypoints' own module, under this name
default_cfgs = generate_default_cfgs(PRETRAINED_CFGS)

_SOURCES = ("file", "url", "hf_hub_id", "state_dict")


def _create(name: str, pretrained: bool, **kwargs) -> Backbone:
    cls, archs = (restv2.ResTV2, restv2.ARCHS) if name in restv2.ARCHS else (rest_v1.ResT, rest_v1.ARCHS)
    if pretrained:
        cfg = resolve_pretrained_cfg(name, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
        if not any(getattr(cfg, key, None) for key in _SOURCES):
            # timm would only log a warning and return random weights
            raise ValueError(
                f"{name}: the released weights are on Baidu Pan / Google Drive ({cfg.origin_url}) and cannot be "
                f"downloaded by a program; download the file and pass pretrained_cfg_overlay=dict(file=PATH)"
            )
    return build_model_with_cfg(
        cls,
        name,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **{**archs[name], **kwargs},
    )


def _entrypoint(name: str) -> Callable[..., Backbone]:
    """A timm entrypoint named ``name`` (timm registers functions by their ``__name__``)."""

    def entrypoint(pretrained: bool = False, **kwargs) -> Backbone:
        return _create(name, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"``restv2.{name}`` through timm (``timm.create_model({name!r}, ...)``)."
    return register_model(entrypoint)


for _name in (*restv2.ARCHS, *rest_v1.ARCHS):
    globals()[_name] = _entrypoint(_name)
