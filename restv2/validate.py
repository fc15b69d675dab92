"""Top-1/top-5 of a checkpoint on an ImageNet-style folder, with the authors' evaluation
preprocessing (``restv2.data.eval_transform``).

    python -m restv2.validate --checkpoint out/checkpoint-best.pth --data-dir /data/imagenet
    python -m restv2.validate --model restv2_tiny --checkpoint restv2_tiny_224.pth --data-dir /data/imagenet

``--checkpoint`` takes a file written by ``restv2.train`` (model name, class count and image
size are read from it; ``--ema`` evaluates its EMA weights) or a released file (give
``--model``). ``--data-dir`` is the folder with ``val/`` or the class folders themselves. Under
torchrun the images are split across the processes and the counts summed. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import MODELS
from .checkpoint import unwrap_state_dict
from .data import ShardSampler, eval_transform, image_folder, worker_context

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def autocast(device: torch.device, amp: str):
    """``torch.autocast`` for ``--amp`` (``"bf16"``, ``"fp16"`` or ``"off"``)."""
    if AMP_DTYPES[amp] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, amp: str = "off") -> dict:
    """Loss, top-1 and top-5 (percent) over every image of ``loader``; with torch.distributed
    initialised, each process evaluates its shard and the sums are reduced."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, images
    count = torch.zeros(4, dtype=torch.float64)  # images, counted on the host
    for images, target in loader:
        count[3] += target.numel()
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices == target[:, None]
        sums[0] += F.cross_entropy(logits, target, reduction="sum")
        sums[1] += top[:, :1].any(1).sum()
        sums[2] += top.any(1).sum()
    sums += count.to(device)
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train(was_training)
    loss, top1, top5, n = sums.tolist()
    if n == 0:
        raise ValueError("the validation loader produced no images")
    return {"loss": loss / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "images": int(n)}


def val_loader(root: str, transform, batch_size: int, workers: int, classes=None, pin_memory: bool = False):
    """A DataLoader over a checked validation folder, sharded across the ranks without padding."""
    dataset = image_folder(root, transform, classes)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset)), num_workers=workers,
        multiprocessing_context=worker_context(workers), pin_memory=pin_memory, drop_last=False,
    )  # fmt: skip


def setup(device: str | None = None) -> torch.device:
    """The device (default: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU) and, under
    torchrun (``WORLD_SIZE`` > 1), the process group: NCCL on CUDA, gloo on the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ValueError(
                f"{device} is not there: this machine has {torch.cuda.device_count()} CUDA device(s); start at most that "
                "many processes per node, or pass --device cpu"
            )
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m restv2.validate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a restv2.train checkpoint or a released file")
    p.add_argument("--data-dir", required=True, help="folder holding val/, or the class folders themselves")
    p.add_argument("--model", choices=sorted(MODELS), help="needed for released files; read from ours")
    p.add_argument("--num-classes", type=int, help="default: from the checkpoint (ours), else 1000")
    p.add_argument("--img-size", type=int, help="default: the checkpoint's training size (ours), else 224")
    p.add_argument("--crop-pct", type=float, help="default: the authors' (ResTv2 1.0, ResTv1 0.875)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a restv2.train checkpoint")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--amp", choices=sorted(AMP_DTYPES), help="default: bf16 on CUDA, off on the CPU")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"))
    p.add_argument("--device", help="default: cuda (cuda:LOCAL_RANK under torchrun) when available, else cpu")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    obj = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    saved = obj.get("args", {}) if isinstance(obj, dict) and "restv2_train" in obj else {}
    if args.ema:
        if not isinstance(obj, dict) or not isinstance(obj.get("model_ema"), dict):
            raise ValueError(f"--ema: {args.checkpoint} holds no EMA weights (key 'model_ema')")
        obj = {"model": obj["model_ema"]}
    state_dict = unwrap_state_dict(obj)
    name = args.model or saved.get("model")
    if name is None:
        raise ValueError(f"{args.checkpoint} is not a restv2.train checkpoint: give --model")
    num_classes = args.num_classes or saved.get("num_classes") or state_dict["head.weight"].shape[0]
    img_size = args.img_size or saved.get("img_size") or 224

    device = setup(args.device)
    try:
        model = MODELS[name](num_classes=num_classes, backend=args.backend)
        model.load_state_dict(state_dict)  # strict, as restv2.load_checkpoint
        model.to(device)
        root = (
            os.path.join(args.data_dir, "val") if os.path.isdir(os.path.join(args.data_dir, "val")) else args.data_dir
        )
        loader = val_loader(
            root, eval_transform(name, img_size, args.crop_pct), args.batch_size, args.workers,
            pin_memory=device.type == "cuda",
        )  # fmt: skip
        amp = args.amp or ("bf16" if device.type == "cuda" else "off")
        metrics = evaluate(model, loader, device, amp)
        result = {"checkpoint": args.checkpoint, "model": name, "ema": args.ema, "img_size": img_size, **metrics}
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(json.dumps(result), flush=True)
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def cli() -> None:
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
