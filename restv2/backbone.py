"""What ResTV2 and ResT share: the four-stage loop, timm-style dense-prediction API, backend switch."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn as nn

from restv2_kernels.backend import check_backend, default_backend, use_kernels

from .checkpoint import load_checkpoint
from .layers import add_norm, check_image, drop_path_rates, ops_for, stage_indices, to_map


class Backbone(nn.Module):
    """Four stages, each a patch embed (``embeds[i]``) followed by blocks (``stages[i]``).

    Subclasses set ``embed_names`` (attribute names of the four embeds, so the
    state-dict keys stay the released ones), build the embeds, call ``_add_stages``, then
    set ``norm`` and ``head``.
    """

    embed_names: tuple[str, str, str, str]

    def _init_common(self, in_chans: int, num_classes: int, embed_dims: list[int], backend: str | None) -> str:
        """Records the sizes and ``feature_info``; returns the resolved backend."""
        self._backend = default_backend() if backend is None else check_backend(backend)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dims = list(embed_dims)
        self.num_features = embed_dims[-1]
        self.feature_info = [
            dict(num_chs=c, reduction=4 * 2**i, module=f"stage{i + 1}") for i, c in enumerate(embed_dims)
        ]
        return self._backend

    def _add_stages(self, depths: list[int], drop_path_rate: float, make_block: Callable[[int, float], nn.Module]) -> None:
        """``stage1``..``stage4``: ModuleLists of ``make_block(stage_index, drop_path)``, with
        drop-path rates rising linearly over all blocks."""
        rates = iter(drop_path_rates(drop_path_rate, sum(depths)))
        for i, depth in enumerate(depths):
            self.add_module(f"stage{i + 1}", nn.ModuleList([make_block(i, next(rates)) for _ in range(depth)]))

    # ------------------------------------------------------------------ backend

    @property
    def backend(self) -> str:
        """The backend the attention layers use: ``"auto"``, ``"triton"`` or ``"reference"``."""
        return self._backend

    def set_backend(self, name: str | None = None) -> Backbone:
        """Switches every attention layer to ``name`` (None: ``RESTV2_BACKEND`` or ``"auto"``)."""
        name = default_backend() if name is None else check_backend(name)
        self._backend = name
        for m in self.modules():
            if m is not self and hasattr(m, "backend"):
                m.backend = name
        return self

    # ------------------------------------------------------------------ forward

    def _embeds(self) -> list[nn.Module]:
        return [getattr(self, n) for n in self.embed_names]

    def _stages(self) -> list[nn.ModuleList]:
        return [self.stage1, self.stage2, self.stage3, self.stage4]

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """Checks the image batch; on the kernel path makes it channels-last, so that every conv
        writes a channels-last map and tokens and maps are views of one buffer (no layout copies)."""
        check_image(x, self.in_chans)
        if use_kernels(self.backend, x):
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _stage(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
        """Stage ``i`` on a map: its patch embed, then its blocks. Returns the tokens without the
        last block's branch, that branch (None for a stage without blocks), and the map size:
        the caller adds the branch, fused with the LayerNorm that follows where there is one."""
        x, H, W = self._embeds()[i](x)
        branch = None
        for blk in self._stages()[i]:
            x, branch = blk.run(x, branch, H, W)
        return x, branch, H, W

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | list[int] | tuple[int, ...] | None = None
    ) -> list[torch.Tensor]:
        """The stage maps [B, C_i, H_i, W_i] (strides 4, 8, 16, 32), each after its stage's blocks.

        ``indices``: None for all four, an int n for the last n, or a list of stage
        indices. Stops after the last stage asked for. Stage 4's map is taken before the
        final ``norm`` (``forward_features`` applies it).
        """
        x = self._input(x)
        take = stage_indices(indices)
        outs = []
        for i in range(4):
            x, branch, H, W = self._stage(i, x)
            x = to_map(x if branch is None else x + branch, H, W)
            if i in take:
                outs.append(x)
            if i == take[-1]:
                break
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final normalised map [B, C_4, H_4, W_4]."""
        x = self._input(x)
        for i in range(3):
            x, branch, H, W = self._stage(i, x)
            x = to_map(x if branch is None else x + branch, H, W)
        x, branch, H, W = self._stage(3, x)
        _, x = add_norm(ops_for(self.backend, x), x, branch, self.norm)
        return to_map(x, H, W)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool of a [B, C, H, W] map, then the classifier (unless ``pre_logits``)."""
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------ head

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the head (``num_classes=0``: a headless backbone returning pooled features)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def build(cls: type[Backbone], checkpoint_path: str | os.PathLike | None, **kwargs) -> Backbone:
    """``cls(**kwargs)``, then the released checkpoint at ``checkpoint_path`` if one is given."""
    model = cls(**kwargs)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path)
    return model
