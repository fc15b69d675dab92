"""What ResTV2 and ResT share: the four-stage loop, timm-style dense-prediction API, backend switch."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from restv2_kernels.backend import check_backend, default_backend, use_kernels

from .checkpoint import load_checkpoint
from .layers import DroppedBranch, add_branch, add_norm, check_image, drop_path_rates, ops_for, stage_indices, to_map


class Backbone(nn.Module):
    """Four stages, each a patch embed (``embeds[i]``) followed by blocks (``stages[i]``).

    Subclasses set ``embed_names`` (attribute names of the four embeds, so the
    state-dict keys stay the released ones), build the embeds, call ``_add_stages``, then
    set ``norm`` and ``head``.
    """

    embed_names: tuple[str, str, str, str]

    def _init_common(
        self, in_chans: int, num_classes: int, global_pool: str, embed_dims: list[int], backend: str | None
    ) -> str:
        """Records the sizes and ``feature_info``; returns the resolved backend."""
        self._backend = default_backend() if backend is None else check_backend(backend)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = _check_pool(global_pool, num_classes)
        self.embed_dims = list(embed_dims)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.num_stages = 4
        self.grad_checkpointing = False
        self.feature_info = [
            dict(num_chs=c, reduction=4 * 2**i, module=f"stage{i + 1}") for i, c in enumerate(embed_dims)
        ]
        return self._backend

    def _add_stages(
        self, depths: list[int], drop_path_rate: float, make_block: Callable[[int, float], nn.Module]
    ) -> None:
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
        return [getattr(self, n) for n in self.embed_names[: self.num_stages]]

    def _stages(self) -> list[nn.ModuleList]:
        return [getattr(self, f"stage{i + 1}") for i in range(self.num_stages)]

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """Checks the image batch; on the kernel path makes it channels-last, so that every conv
        writes a channels-last map and tokens and maps are views of one buffer (no layout copies)."""
        check_image(x, self.in_chans, next(self._embeds()[0].parameters(), None))
        if use_kernels(self.backend, x):
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _stage(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | DroppedBranch | None, int, int]:
        """Stage ``i`` on a map: its patch embed, then its blocks. Returns the tokens without the
        last block's branch, that branch (None for a stage without blocks; a ``DroppedBranch``
        where its drop path is still to apply), and the map size: the caller adds the branch,
        fused with the LayerNorm that follows where there is one."""
        x, H, W = self._embeds()[i](x)
        branch = None
        for blk in self._stages()[i]:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, branch = checkpoint(blk.run, x, branch, H, W, use_reentrant=False)
            else:
                x, branch = blk.run(x, branch, H, W)
        return x, branch, H, W

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The stage maps (strides 4, 8, 16, 32), each after its stage's blocks, with timm's
        signature and conventions.

        Args:
            indices: None for every stage, an int n for the last n, or a sequence of stage
                indices (negatives count from the end).
            norm: apply the final ``norm`` to stage 4's map (the only one it fits).
            stop_early: stop after the last stage asked for (the returned final map is then
                that stage's, without ``norm``).
            output_fmt: ``"NCHW"`` ([B, C, H, W]) or ``"NHWC"`` ([B, H, W, C]); both are views.
            intermediates_only: return only the list of maps (and stop after the last one).

        Returns:
            ``(final, intermediates)``: ``final`` is ``forward_features(x)`` (unless stopped
            early), or only ``intermediates`` when ``intermediates_only``.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take = stage_indices(indices, self.num_stages)
        last = take[-1] if stop_early or intermediates_only else self.num_stages - 1
        x = self._input(x)
        intermediates = []
        for i in range(last + 1):
            x, branch, H, W = self._stage(i, x)
            if i == self.num_stages - 1 and (i in take and norm or not intermediates_only):
                residual, normed = self._final_norm(x, branch)
                x = to_map(normed, H, W)
                if i in take:
                    intermediates.append(x if norm else to_map(residual, H, W))
            else:
                x = to_map(add_branch(x, branch), H, W)
                if i in take:
                    intermediates.append(x)
        if output_fmt == "NHWC":
            intermediates = [t.permute(0, 2, 3, 1) for t in intermediates]
        return intermediates if intermediates_only else (x, intermediates)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final normalised map [B, C_4, H_4, W_4]."""
        return self.forward_intermediates(x, indices=1)[0]

    def _final_norm(
        self, x: torch.Tensor, branch: torch.Tensor | DroppedBranch | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + branch, norm(x + branch))`` on the last stage's tokens, fused on the kernel path."""
        return add_norm(ops_for(self.backend, x), x, branch, self.norm)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool of a [B, C, H, W] map (none with ``global_pool=""``), then the
        classifier (unless ``pre_logits``)."""
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------ timm's model contract

    def prune_intermediate_layers(
        self, indices: int | list[int] | tuple[int, ...] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Removes the stages after the last one in ``indices`` (for feature extraction); returns
        the stage indices, made absolute. The final ``norm`` is removed with ``prune_norm``, and
        always when stage 4 is (it fits no other stage); ``prune_head`` removes the classifier
        and the pooling (``forward`` then returns the final map)."""
        take = stage_indices(indices, self.num_stages)
        for i in range(take[-1] + 1, self.num_stages):
            delattr(self, self.embed_names[i])
            delattr(self, f"stage{i + 1}")
        self.num_stages = take[-1] + 1
        if prune_norm or self.num_stages < 4:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward instead of storing them
        (``torch.utils.checkpoint``, non-reentrant): less memory, one more forward."""
        self.grad_checkpointing = enable

    # ------------------------------------------------------------------ head

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replaces the head (``num_classes=0``: a headless backbone returning pooled features;
        ``global_pool=""`` too: the final map, unpooled)."""
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool, num_classes)
        else:
            _check_pool(self.global_pool, num_classes)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def _check_pool(global_pool: str, num_classes: int) -> str:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
    if global_pool == "" and num_classes > 0:
        raise ValueError(f"global_pool='' (no pooling) needs num_classes=0, got num_classes={num_classes}")
    return global_pool


FACTORY_ARGS = """

    Args:
        checkpoint_path: a checkpoint to load strictly after building (a released file or one
            saved from this package: a bare state dict, or one under ``model``, ``state_dict`` or
            ``model_ema``). None: random initialisation.
        **kwargs: {cls} arguments, e.g. ``num_classes`` (1000; 0 for a headless backbone),
            ``in_chans`` (3), ``drop_path_rate`` (0.0), ``global_pool`` ("avg", or "" with
            ``num_classes=0`` for the unpooled final map) and ``backend`` ("auto", "triton" or
            "reference").

    Returns:
        the model, in training mode as any new ``nn.Module``.
    """


def document_factories(cls: type[Backbone], *factories: Callable) -> None:
    """Appends the arguments every factory shares to each factory's one-line docstring (what
    ``help()`` and ``torch.hub.help`` show)."""
    for f in factories:
        f.__doc__ = f.__doc__.rstrip() + FACTORY_ARGS.format(cls=cls.__name__)


def build(cls: type[Backbone], checkpoint_path: str | os.PathLike | None, **kwargs) -> Backbone:
    """``cls(**kwargs)``, then the released checkpoint at ``checkpoint_path`` if one is given."""
    model = cls(**kwargs)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path)
    return model
