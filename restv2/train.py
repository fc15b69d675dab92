"""Train or fine-tune a model of the zoo on an ImageNet-style folder, with the published recipe.

    python -m restv2.train --data-dir /data/imagenet --model restv2_tiny --accum-steps 8
    torchrun --nproc-per-node 8 -m restv2.train --data-dir /data/imagenet --model restv2_tiny
    torchrun --nproc-per-node 8 -m restv2.train --data-dir /data/imagenet --model restv2_tiny \\
        --recipe in1k-ft-384 --finetune restv2_tiny_224.pth --batch-size 64

``--data-dir`` holds ``train/`` and ``val/``, one sub-folder per class. Under torchrun the
processes run DistributedDataParallel (NCCL on GPUs, gloo on the CPU); rank 0 alone writes
``--output-dir``: ``checkpoint-last.pth`` (everything needed to resume) after every epoch,
``checkpoint-best.pth`` (weights only) at the best validation top-1, ``log.jsonl`` (one line per
epoch) and ``steps.jsonl`` (one line per ``--log-interval`` optimizer updates).

The recipe (``--recipe in1k``, the default) is the authors' ImageNet-1k command (TRAINING.md of
github.com/wofmanaf/ResT): AdamW (eps 1e-8, weight decay 0.05, none on norms and biases), lr
1.5e-4 per 256 images of the global batch (``--batch-size`` x ``--accum-steps`` x processes;
published: 8 GPUs x 256), cosine to 1e-6 per update after 50 linear warm-up epochs of 300,
gradient clipping 1.0, EMA 0.9999, drop path by model (``DROP_PATH``), RandAugment
rand-m9-mstd0.5-inc1, colour jitter 0.4, bicubic, random erasing 0.25, Mixup 0.8 / CutMix 1.0
(switch 0.5), label smoothing 0.1. ``--recipe in1k-ft-384`` is the published 384 fine-tuning:
lr 1.5e-5 per 256, 30 epochs, no warm-up, weight decay 1e-8, no Mixup/CutMix, no EMA. Any flag
given explicitly overrides the recipe. The pieces are timm's (data, augmentation, Mixup, losses,
EMA, scheduler, optimizer parameter groups).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import resource
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import DROP_PATH, MODELS
from .checkpoint import load_checkpoint, unwrap_state_dict
from .data import eval_transform, image_folder, train_transform, worker_context
from .validate import AMP_DTYPES, autocast, evaluate, setup, val_loader

#: What each recipe sets; flags given on the command line win.
RECIPES = {
    "in1k": dict(
        img_size=224, epochs=300, warmup_epochs=50, base_lr=1.5e-4, weight_decay=0.05, model_ema=True,
        mixup=0.8, cutmix=1.0,
    ),
    "in1k-ft-384": dict(
        img_size=384, epochs=30, warmup_epochs=0, base_lr=1.5e-5, weight_decay=1e-8, model_ema=False,
        mixup=0.0, cutmix=0.0,
    ),
}  # fmt: skip

CHECKPOINT_FORMAT = 1

# DDP compares a gradient's strides with its bucket's, size-1 dimensions included: the depthwise
# convs' [C, 1, 3, 3] weight gradients come back with another (equally dense) stride in the
# size-1 dimension, which autograd's layout contract accepts and the bucket copy handles.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m restv2.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data and model")
    g.add_argument("--data-dir", required=True, help="folder holding train/ and val/ (one sub-folder per class)")
    g.add_argument("--model", default="restv2_tiny", choices=sorted(MODELS))
    g.add_argument("--num-classes", type=int, help="default: the number of class folders in train/")
    g.add_argument("--img-size", type=int, help="training and evaluation size (recipe: 224, or 384 to fine-tune)")
    g.add_argument("--drop-path", type=float, help="stochastic depth (default: DROP_PATH of the model)")
    g.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"))
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers per process")
    g = p.add_argument_group("run")
    g.add_argument("--recipe", default="in1k", choices=sorted(RECIPES))
    g.add_argument("--output-dir", default="output")
    g.add_argument("--resume", help="a checkpoint-last.pth to continue, or 'auto' (the output dir's, if any)")
    g.add_argument(
        "--finetune", help="initial weights: a released file or one of ours; a head of another size is re-initialised"
    )
    g.add_argument("--device", help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    g.add_argument("--amp", choices=sorted(AMP_DTYPES), help="default: bf16 on CUDA, off on the CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--log-interval", type=int, default=50, help="optimizer updates between steps.jsonl lines")
    g = p.add_argument_group("optimisation (default: the recipe's)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--batch-size", type=int, default=256, help="images per process per forward")
    g.add_argument("--accum-steps", type=int, default=1, help="forwards per optimizer update")
    g.add_argument("--base-lr", type=float, help="lr per 256 images of the global batch")
    g.add_argument("--lr", type=float, help="absolute lr (overrides --base-lr)")
    g.add_argument("--min-lr", type=float, default=1e-6)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm; 0 turns clipping off")
    g.add_argument("--model-ema", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--model-ema-decay", type=float, default=0.9999)
    g = p.add_argument_group("augmentation and loss")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm auto-augment policy; 'none' for none")
    g.add_argument("--color-jitter", type=float, default=0.4)
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    g.add_argument("--mixup", type=float, help="Mixup alpha")
    g.add_argument("--cutmix", type=float, help="CutMix alpha")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--smoothing", type=float, default=0.1)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the recipe filling whatever it leaves unset, and checked."""
    p = build_parser()
    args = p.parse_args(argv)
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.drop_path is None:
        args.drop_path = DROP_PATH[args.model]
    positive = ("batch_size", "accum_steps", "epochs", "img_size", "log_interval", "model_ema_decay")
    for key in positive:
        if getattr(args, key) <= 0:
            p.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    if args.img_size < 32:
        p.error(f"--img-size must be at least 32 (the models downsample by 32), got {args.img_size}")
    if not 0 <= args.warmup_epochs <= args.epochs:
        p.error(f"--warmup-epochs must be between 0 and --epochs ({args.epochs}), got {args.warmup_epochs}")
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        p.error(f"Mixup/CutMix mix pairs of images: --batch-size must be even, got {args.batch_size}")
    if args.recipe == "in1k-ft-384" and not (args.finetune or args.resume):
        p.error("--recipe in1k-ft-384 fine-tunes trained weights: give --finetune CHECKPOINT")
    if args.aa.lower() == "none":
        args.aa = None
    return args


# --- distributed ---------------------------------------------------------------------------


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


# --- random state ----------------------------------------------------------------------------


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    """This process's random generators (Python, NumPy, torch, CUDA), as tensors and plain
    values only, so checkpoints load with ``weights_only=True``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


# --- checkpoints -----------------------------------------------------------------------------


def save_atomic(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, flushed to disk, then renamed over
    ``path``: a kill at any moment leaves either the old file or the new one, never half of one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows it
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_finetune(model: torch.nn.Module, path: str) -> list[str]:
    """Loads initial weights from a released file or a ``restv2.train`` checkpoint (its
    ``model`` weights). Head tensors whose shape differs (another class count) are left as
    initialised; every other tensor must match. Returns the keys left out."""
    state_dict = unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    own = model.state_dict()
    head = [k for k in own if k.startswith("head.")]
    dropped = [k for k in head if k in state_dict and state_dict[k].shape != own[k].shape]
    for k in dropped:
        del state_dict[k]
    missing, unexpected = load_checkpoint(model, state_dict, strict=False)
    missing = [k for k in missing if k not in head]
    if missing or unexpected:
        raise ValueError(
            f"--finetune {path} does not match this {type(model).__name__}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]} (is it another model of the zoo?)"
        )
    return dropped


def trim_jsonl(path: str, key: str, last: int) -> None:
    """Keeps the lines of a JSON-lines log whose ``key`` is at most ``last``."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)[key] <= last]
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


# --- training --------------------------------------------------------------------------------


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    return MODELS[args.model](num_classes=args.num_classes, drop_path_rate=args.drop_path, backend=args.backend)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the peak of allocated memory since the last reset; CPU: the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Run:
    """Everything one training process holds: model, optimizer, data, and the counters a
    checkpoint records."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device = args, device
        self.is_main = rank() == 0
        self.amp = args.amp or ("bf16" if device.type == "cuda" else "off")
        train_dir, val_dir = (os.path.join(args.data_dir, split) for split in ("train", "val"))
        self.train_set = image_folder(
            train_dir, train_transform(args.img_size, args.aa, args.color_jitter, args.reprob)
        )
        classes = self.train_set.classes
        self.val_loader = val_loader(
            val_dir, eval_transform(args.model, args.img_size), args.batch_size, args.workers, classes,
            pin_memory=device.type == "cuda",
        )  # fmt: skip
        if args.num_classes is None:
            args.num_classes = len(classes)
        elif args.num_classes < len(classes):
            raise ValueError(
                f"--num-classes {args.num_classes} is fewer than the {len(classes)} class folders of {train_dir}"
            )

        self.sampler = torch.utils.data.DistributedSampler(
            self.train_set, num_replicas=world_size(), rank=rank(), shuffle=True, seed=args.seed, drop_last=True
        )
        self.train_loader = torch.utils.data.DataLoader(
            self.train_set, batch_size=args.batch_size, sampler=self.sampler, num_workers=args.workers,
            multiprocessing_context=worker_context(args.workers), pin_memory=device.type == "cuda", drop_last=True,
        )  # fmt: skip
        self.updates_per_epoch = len(self.train_loader) // args.accum_steps
        if self.updates_per_epoch == 0:
            raise ValueError(
                f"{train_dir}: {len(self.train_set)} images give {len(self.train_loader)} batches of {args.batch_size} "
                f"per process ({world_size()} processes), fewer than --accum-steps {args.accum_steps}"
            )

        seed_all(args.seed)  # the same initial weights in every process
        self.model = build_model(args).to(device)
        if args.finetune and not args.resume:
            dropped = load_finetune(self.model, args.finetune)
            self.log(f"fine-tuning from {args.finetune}" + (f"; re-initialised {dropped}" if dropped else ""))
        self.ema = ModelEmaV3(self.model, decay=args.model_ema_decay) if args.model_ema else None

        self.global_batch = args.batch_size * args.accum_steps * world_size()
        lr = args.lr if args.lr is not None else args.base_lr * self.global_batch / 256
        self.optimizer = create_optimizer_v2(self.model, "adamw", lr=lr, weight_decay=args.weight_decay, eps=1e-8)
        warmup = round(args.warmup_epochs * self.updates_per_epoch)
        self.scheduler = CosineLRScheduler(
            self.optimizer, t_initial=max(1, args.epochs * self.updates_per_epoch - warmup), lr_min=args.min_lr,
            warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False,
        )  # fmt: skip
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == "fp16")
        mixing = args.mixup > 0 or args.cutmix > 0
        self.mixup = (
            Mixup(
                mixup_alpha=args.mixup,
                cutmix_alpha=args.cutmix,
                switch_prob=args.mixup_switch_prob,
                mode="batch",
                label_smoothing=args.smoothing,
                num_classes=args.num_classes,
            )  # fmt: skip
            if mixing
            else None
        )
        if mixing:
            self.criterion = SoftTargetCrossEntropy()
        elif args.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(args.smoothing)
        else:
            self.criterion = torch.nn.CrossEntropyLoss()

        self.epoch, self.update, self.best_top1 = 0, 0, -1.0
        self.last_good: str | None = None
        seed_all(args.seed + rank())  # augmentation, drop path and Mixup differ per process
        if args.resume:
            self.resume(args.resume)
        self.scheduler.step_update(self.update)

        self.ddp = None
        if dist.is_initialized():
            self.ddp = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.forward = self.ddp if self.ddp is not None else self.model
        if args.compile:
            self.forward = torch.compile(self.forward)

    def log(self, message: str) -> None:
        if self.is_main:
            print(f"[restv2.train] {message}", file=sys.stderr, flush=True)

    def path(self, name: str) -> str:
        return os.path.join(self.args.output_dir, name)

    # checkpoints

    def state(self, rng: list[dict]) -> dict:
        return {
            "restv2_train": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "model_ema": self.ema.module.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "update": self.update,
            "best_top1": self.best_top1,
            "rng": rng,
            "world_size": world_size(),
            "args": vars(self.args),
        }

    def save(self, metrics: dict) -> None:
        """Rank 0 writes ``checkpoint-last.pth`` (and ``checkpoint-best.pth``); every process
        contributes its random state."""
        rng = [None] * world_size()
        if dist.is_initialized():
            dist.all_gather_object(rng, rng_state(self.device))
        else:
            rng[0] = rng_state(self.device)
        is_best = metrics["val_top1"] > self.best_top1
        self.best_top1 = max(self.best_top1, metrics["val_top1"])
        if self.is_main:
            state = self.state(rng)
            save_atomic(state, self.path("checkpoint-last.pth"))
            if is_best:
                weights = {k: v for k, v in state.items() if k not in ("optimizer", "scaler", "scheduler", "rng")}
                save_atomic({**weights, "metrics": metrics}, self.path("checkpoint-best.pth"))
        self.last_good = self.path("checkpoint-last.pth")

    def resume(self, path: str) -> None:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt.get("restv2_train") != CHECKPOINT_FORMAT:
            raise ValueError(f"--resume {path} is not a restv2.train checkpoint (use --finetune for weights)")
        if ckpt["args"]["model"] != self.args.model:
            raise ValueError(f"--resume {path} holds a {ckpt['args']['model']}, not a {self.args.model}")
        self.model.load_state_dict(ckpt["model"])
        if self.ema is not None:
            if ckpt["model_ema"] is None:
                raise ValueError(f"--resume {path} was trained without --model-ema")
            self.ema.module.load_state_dict(ckpt["model_ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.epoch, self.update, self.best_top1 = ckpt["epoch"], ckpt["update"], ckpt["best_top1"]
        if ckpt["world_size"] == world_size():
            set_rng_state(ckpt["rng"][rank()], self.device)
        else:
            warnings.warn(
                f"resuming {ckpt['world_size']}-process training on {world_size()} processes: the random streams "
                "are re-seeded, so the run continues correctly but not bit-for-bit",
                stacklevel=2,
            )
            seed_all(self.args.seed + rank() + 1000003 * self.epoch)
        self.last_good = path
        if self.is_main:  # drop what the interrupted run logged after this checkpoint
            trim_jsonl(self.path("steps.jsonl"), "update", self.update)
            trim_jsonl(self.path("log.jsonl"), "epoch", self.epoch)
        self.log(f"resumed from {path} after epoch {self.epoch} (update {self.update})")

    # one epoch

    def train_epoch(self) -> dict:
        args, device = self.args, self.device
        self.model.train()
        self.sampler.set_epoch(self.epoch)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        micro_steps = self.updates_per_epoch * args.accum_steps
        bar = tqdm(
            total=self.updates_per_epoch, desc=f"epoch {self.epoch + 1}/{args.epochs}", unit="update",
            disable=None if self.is_main else True, dynamic_ncols=True,
        )  # fmt: skip
        loss_sum, update_loss = 0.0, 0.0
        start = time.perf_counter()
        steps_log = open(self.path("steps.jsonl"), "a") if self.is_main else None
        try:
            for i, (images, target) in enumerate(self.train_loader):
                if i == micro_steps:
                    break
                images = images.to(device, non_blocking=True)
                target = target.to(device, non_blocking=True)
                if self.mixup is not None:
                    images, target = self.mixup(images, target)
                last_micro = (i + 1) % args.accum_steps == 0
                sync = self.ddp.no_sync() if self.ddp is not None and not last_micro else contextlib.nullcontext()
                with sync:
                    with autocast(device, self.amp):
                        loss = self.criterion(self.forward(images), target)
                    self.scaler.scale(loss / args.accum_steps).backward()
                value = loss.detach().float()
                if dist.is_initialized():
                    dist.all_reduce(value)
                value = value.item() / world_size()  # the one host sync of a micro-step
                if not math.isfinite(value):
                    raise FloatingPointError(self.non_finite("loss", value, i))
                update_loss += value / args.accum_steps
                if not last_micro:
                    continue

                if args.clip_grad > 0:
                    self.scaler.unscale_(self.optimizer)
                    norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.clip_grad)
                    if self.amp != "fp16" and not math.isfinite(norm.item()):
                        raise FloatingPointError(self.non_finite("gradient norm", norm.item(), i))
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update(self.model)
                self.update += 1
                lr = self.optimizer.param_groups[0]["lr"]
                self.scheduler.step_update(self.update)
                loss_sum += update_loss
                done = (i + 1) // args.accum_steps
                if self.is_main and (self.update % args.log_interval == 0 or done == self.updates_per_epoch):
                    rate = done * args.accum_steps * args.batch_size * world_size() / (time.perf_counter() - start)
                    line = {"epoch": self.epoch + 1, "update": self.update, "loss": update_loss, "lr": lr}
                    steps_log.write(json.dumps(line) + "\n")
                    steps_log.flush()
                    bar.set_postfix(loss=f"{update_loss:.4f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}", refresh=False)
                bar.update(1)
                update_loss = 0.0
        finally:
            bar.close()
            if steps_log is not None:
                steps_log.close()
        seconds = time.perf_counter() - start
        peak = torch.tensor(peak_memory_mb(device), device=device)
        if dist.is_initialized():
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return {
            "train_loss": loss_sum / self.updates_per_epoch,
            "images_per_s": micro_steps * args.batch_size * world_size() / seconds,
            "peak_memory_mb": peak.item(),
            "lr": self.optimizer.param_groups[0]["lr"],
        }

    def sync_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm statistics) in every process, for the model and the EMA.
        DDP broadcasts them before each training forward, but each process's last forward then
        updated its own: without this, the processes would evaluate (and the EMA average)
        different statistics from those rank 0 saves."""
        if not dist.is_initialized():
            return
        for module in (self.model, self.ema.module if self.ema else None):
            for buffer in module.buffers() if module is not None else ():
                dist.broadcast(buffer, 0)

    def non_finite(self, what: str, value: float, step: int) -> str:
        keep = f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was written yet"
        return (
            f"non-finite {what} ({value}) in epoch {self.epoch + 1}, batch {step}: stopping; {keep} "
            "(lower --lr / --base-lr, or try --amp bf16 instead of fp16)"
        )

    def fit(self) -> list[dict]:
        args = self.args
        if self.is_main:
            with open(self.path("args.json"), "w") as f:
                json.dump(vars(args), f, indent=1)
        self.log(
            f"{args.model} on {len(self.train_set)} images, {args.num_classes} classes, {world_size()} process(es) on "
            f"{self.device.type}, global batch {self.global_batch}, lr {self.optimizer.param_groups[0]['initial_lr']:.3g}, "
            f"{self.updates_per_epoch} updates per epoch, amp {self.amp}"
        )
        history = []
        while self.epoch < args.epochs:
            metrics = self.train_epoch()
            self.sync_buffers()
            val = evaluate(self.model, self.val_loader, self.device, self.amp)
            metrics = {
                "epoch": self.epoch + 1, **metrics, "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
            }  # fmt: skip
            if self.ema is not None:
                ema = evaluate(self.ema.module, self.val_loader, self.device, self.amp)
                metrics.update(ema_top1=ema["top1"], ema_top5=ema["top5"])
            self.epoch += 1
            self.save(metrics)
            if self.is_main:
                line = json.dumps(metrics)
                print(line, flush=True)
                with open(self.path("log.jsonl"), "a") as f:
                    f.write(line + "\n")
            history.append(metrics)
        return history


def resolve_resume(args: argparse.Namespace) -> None:
    """``--resume auto`` becomes the output dir's ``checkpoint-last.pth`` (or nothing); an output
    dir that already holds a run is refused unless it is resumed."""
    last = os.path.join(args.output_dir, "checkpoint-last.pth")
    if args.resume == "auto":
        args.resume = last if os.path.exists(last) else None
    elif args.resume is None and os.path.exists(last):
        raise ValueError(
            f"{args.output_dir} already holds a run ({last}): pass --resume auto to continue it, or another --output-dir"
        )
    if args.resume is not None and not os.path.isfile(args.resume):
        raise ValueError(f"--resume {args.resume}: no such file")


@record
def main(argv: list[str] | None = None) -> list[dict]:
    """Runs the command line ``argv``; returns the per-epoch metrics (on every process)."""
    args = parse_args(argv)
    resolve_resume(args)
    device = setup(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        if rank() == 0:
            os.makedirs(args.output_dir, exist_ok=True)
        if dist.is_initialized():
            dist.barrier()
        return Run(args, device).fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def cli() -> None:
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
