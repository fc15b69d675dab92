"""ImageNet-style folders for ``restv2.train`` and ``restv2.validate``: checked up front, read
with errors that name the file, preprocessed as the authors' code does (timm's transforms).

Needs torchvision and timm (``pip install "restv2[train]"``); ``import restv2`` never imports
this module.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from PIL import Image
from timm.data import create_transform
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .pretrained import IMAGENET_MEAN, IMAGENET_STD, PRETRAINED_CFGS


def check_image_folder(root: str | os.PathLike, classes: Sequence[str] | None = None) -> list[str]:
    """The class names of an ImageFolder root (one sub-folder per class, sorted), after checking
    that the root exists and every class folder holds at least one image. ``classes``: the
    training set's classes, which a validation folder must match. Raises ValueError naming the
    folder otherwise, before any process starts reading images."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ValueError(f"image folder {root!r} does not exist (expected one sub-folder per class)")
    found = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not found:
        raise ValueError(f"image folder {root!r} has no class sub-folders")
    empty = []
    for name in found:
        has_image = False
        for _dirpath, _dirs, files in os.walk(os.path.join(root, name), followlinks=True):
            if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
                has_image = True
                break
        if not has_image:
            empty.append(name)
    if empty:
        raise ValueError(
            f"image folder {root!r}: class folder(s) {', '.join(repr(e) for e in empty)} hold no image "
            f"(looked for {', '.join(IMG_EXTENSIONS)}); remove them or add images"
        )
    if classes is not None and list(classes) != found:
        missing = sorted(set(classes) - set(found))
        extra = sorted(set(found) - set(classes))
        raise ValueError(
            f"image folder {root!r} does not have the training set's classes: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, extra {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    return found


def load_rgb(path: str) -> Image.Image:
    """One image as RGB. A file PIL cannot decode raises ValueError naming it (a DataLoader
    worker passes the error on to the training process, which stops)."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path!r} ({type(e).__name__}: {e}); delete or replace the file") from None


def image_folder(root: str | os.PathLike, transform, classes: Sequence[str] | None = None) -> ImageFolder:
    """torchvision's ImageFolder over a checked folder, reading with ``load_rgb``."""
    check_image_folder(root, classes)
    return ImageFolder(os.fspath(root), transform=transform, loader=load_rgb)


def eval_transform(model_name: str, img_size: int, crop_pct: float | None = None):
    """The authors' evaluation preprocessing, as the released checkpoints' cfgs state it
    (``restv2.pretrained``): the 384 cfg's at 384 and above where the model has one, else the
    224 cfg's, at ``img_size``; ``crop_pct`` overrides the cfg's."""
    tag = f"{model_name}.in1k_384"
    cfg = PRETRAINED_CFGS[tag if img_size >= 384 and tag in PRETRAINED_CFGS else f"{model_name}.in1k"]
    return create_transform(
        img_size, is_training=False, interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
        crop_pct=cfg["crop_pct"] if crop_pct is None else crop_pct, crop_mode=cfg["crop_mode"],
    )  # fmt: skip


def train_transform(img_size: int, auto_augment: str | None, color_jitter: float, reprob: float):
    """The published training augmentation: RandomResizedCrop (bicubic), flip, RandAugment,
    colour jitter (timm applies it only without RandAugment, as the authors' timm did),
    random erasing in pixel mode."""
    return create_transform(
        img_size, is_training=True, auto_augment=auto_augment, color_jitter=color_jitter, interpolation="bicubic",
        re_prob=reprob, re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    )  # fmt: skip


def worker_context(workers: int) -> multiprocessing.context.BaseContext | None:
    """How DataLoader workers start: from a forkserver (where the platform has one), never by
    forking the training process itself; None (the default) without workers.

    A loader starts its workers again every epoch (they are not persistent, so that a resumed
    run gets the same augmentation streams as an uninterrupted one), and by then the training
    process runs threads of its own (gloo's or NCCL's, the progress bar's). A fork that lands
    while one of them holds the interpreter's thread-list lock leaves the worker hung before
    it runs a line (CPython up to 3.11.7 takes that lock in the child before re-initialising
    it: python/cpython#112275), and rank 0 then waits for its batch forever; 2-process gloo
    runs on Python 3.11.7 hung so at an epoch's validation about once in eight. The forkserver
    is a single-threaded process started by fork + exec; it imports this module (torch,
    torchvision, timm) once, so each worker forked from it starts quickly."""
    if workers == 0 or "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # takes effect when the server starts (the first loader's)
    return context


class ShardSampler(torch.utils.data.Sampler[int]):
    """Every index exactly once across the ranks, in order, without the padding
    DistributedSampler adds (so distributed top-1 counts each validation image once)."""

    def __init__(self, n: int, rank: int | None = None, world_size: int | None = None):
        if world_size is None:
            world_size = dist.get_world_size() if dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_initialized() else 0
        self.indices = range(rank, n, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
