"""``python -m restv2.train`` and ``python -m restv2.validate`` on a generated ImageFolder (four
colour classes, 40x48 images trained at 32x32), on the CPU:

- a 2-process gloo run under torchrun trains (the loss falls, EMA top-1 well above chance) and
  only rank 0 writes;
- a run killed with SIGKILL mid-epoch and resumed gives the same per-update losses, bit for bit,
  as the uninterrupted run;
- fine-tuning from a checkpoint with another class count; a non-finite loss stops the run and
  keeps the last good checkpoint; checkpoints are written atomically;
- a corrupt image and an empty class folder give errors that name them, and no hang;
- the validation CLI reproduces the training log's numbers;
- the README's training commands parse, with the published global batch.

The runs name ``--device cpu`` (the published recipe's run alone takes the machine's default): on a
one-GPU machine the default would put rank 1 on a cuda:1 that is not there, and validate in bf16
where training ran in fp32. torchrun runs ``--standalone``, on a free port: concurrent runs (the
GPU runner runs the suite under pytest-xdist) would collide on the default 29500.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, once_per_session, require

require("timm")
require("torchvision")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from restv2 import train, validate  # noqa: E402

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200), "grey": (128, 128, 128)}
# An easy task, so that a few updates learn it: no augmentation beyond the random crop and flip.
EASY = (
    "--model restv2_tiny --img-size 32 --batch-size 8 --epochs 4 --warmup-epochs 0 --lr 2e-4 --aa none "
    "--mixup 0 --cutmix 0 --reprob 0 --smoothing 0 --drop-path 0 --model-ema-decay 0.9 --log-interval 1 --device cpu"
).split()
TIMEOUT = 300


def make_image_folder(root: Path, colours=COLOURS, n_train: int = 16, n_val: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for name, colour in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.normal(0, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def torchrun(args: list[str]) -> subprocess.Popen:
    """torchrun with 2 processes, on a free port."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "restv2.train",
        *args,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a lost machine would (torchrun
    starts each worker in a session of its own, so killing its process group is not enough)."""
    table = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    children: dict[int, list[int]] = {}
    for line in table.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    for p in tree:
        os.kill(p, signal.SIGSTOP)  # freeze them all first, so that none reacts to another's death
    for p in tree:
        os.kill(p, signal.SIGKILL)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        raise
    return process.returncode, output


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory) -> Path:
    """The uninterrupted 2-process run that the other tests compare against, once per session
    (under pytest-xdist too; every worker's data_dir holds the same images)."""

    def run() -> str:
        out = tmp_path_factory.mktemp("run") / "out"
        args = [*EASY, "--data-dir", str(data_dir), "--output-dir", str(out), "--workers", "1"]
        code, output = finish(torchrun(args))
        assert code == 0, output
        return str(out)

    return Path(once_per_session(tmp_path_factory, "train-full-run", run))


def test_two_process_run_trains_and_only_rank_0_writes(full_run):
    epochs = read_jsonl(full_run / "log.jsonl")
    steps = read_jsonl(full_run / "steps.jsonl")
    # one line per epoch and per update: a second writer would have doubled them
    assert [m["epoch"] for m in epochs] == [1, 2, 3, 4]
    assert [s["update"] for s in steps] == list(range(1, 17))  # 64 images / (2 x 8) per update
    assert sorted(p.name for p in full_run.iterdir()) == [
        "args.json", "checkpoint-best.pth", "checkpoint-last.pth", "log.jsonl", "steps.jsonl",
    ]  # fmt: skip
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert max(m["ema_top1"] for m in epochs) >= 75.0  # chance is 25
    for key in ("images_per_s", "peak_memory_mb", "val_top5", "lr", "val_loss"):
        assert all(math.isfinite(m[key]) for m in epochs), key

    ckpt = torch.load(full_run / "checkpoint-last.pth", weights_only=True)
    assert ckpt["epoch"] == 4 and ckpt["update"] == 16 and ckpt["world_size"] == 2
    assert set(ckpt) >= {"model", "model_ema", "optimizer", "scaler", "scheduler", "rng", "args"}
    # both processes' random streams are saved, and they differ (per-rank seeds)
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    best = torch.load(full_run / "checkpoint-best.pth", weights_only=True)
    assert best["metrics"]["val_top1"] == max(m["val_top1"] for m in epochs) and "optimizer" not in best


def test_resume_after_a_kill_repeats_the_uninterrupted_losses(full_run, data_dir, tmp_path):
    out = tmp_path / "out"
    args = [*EASY, "--data-dir", str(data_dir), "--output-dir", str(out), "--workers", "1"]
    process = torchrun(args)
    steps = out / "steps.jsonl"
    deadline = time.monotonic() + TIMEOUT
    while not (steps.exists() and any(s["epoch"] == 3 for s in read_jsonl(steps))):  # epoch 3 has begun
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "no update of epoch 3 was logged"
        time.sleep(0.02)
    kill_tree(process.pid)
    process.communicate()
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["epoch"] == 2
    assert not list(out.glob("*.tmp*"))

    code, output = finish(torchrun([*args, "--resume", "auto"]))
    assert code == 0, output
    assert "resumed from" in output
    assert read_jsonl(out / "steps.jsonl") == read_jsonl(full_run / "steps.jsonl")  # every loss and lr, exactly
    assert read_jsonl(out / "log.jsonl")[-1]["val_loss"] == read_jsonl(full_run / "log.jsonl")[-1]["val_loss"]
    resumed = torch.load(out / "checkpoint-last.pth", weights_only=True)
    uninterrupted = torch.load(full_run / "checkpoint-last.pth", weights_only=True)
    for key in ("model", "model_ema"):
        for name, value in uninterrupted[key].items():
            assert torch.equal(resumed[key][name], value), (key, name)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_workers_start_from_a_forkserver(data_dir, tmp_path, workers):
    """Workers are never forked from the training process, whose gloo/NCCL threads can hold an
    interpreter lock at the fork (restv2.data.worker_context): on Python 3.11.7 such a fork
    hung a 2-process run of the test above about once in eight."""
    args = train.parse_args([*EASY, "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "out"),
                             "--workers", str(workers)])  # fmt: skip
    run = train.Run(args, torch.device("cpu"))
    for loader in (run.train_loader, run.val_loader):
        context = loader.multiprocessing_context
        assert context is None if workers == 0 else context.get_start_method() == "forkserver"
        images, target = next(iter(loader))  # the dataset and its transforms reach the workers
        assert images.shape == (8, 3, 32, 32) and target.shape == (8,)


def test_the_published_recipe_runs(data_dir, tmp_path, monkeypatch):
    """Everything at its default but the size: RandAugment, random erasing, Mixup/CutMix with
    soft-target loss, drop path, EMA, warm-up, AdamW groups without decay on norms and biases.
    The device too: on a GPU machine this is the one run on CUDA (bf16 autocast, the kernels)."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # main sets it on CUDA
    out = tmp_path / "out"
    args = ["--data-dir", str(data_dir), "--output-dir", str(out), "--model", "rest_lite", "--img-size", "32",
            "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "1", "--workers", "0", "--log-interval", "1"]  # fmt: skip
    history = train.main(args)
    assert all(math.isfinite(m["train_loss"]) and math.isfinite(m["ema_top1"]) for m in history)
    saved = torch.load(out / "checkpoint-last.pth", weights_only=True)
    a = saved["args"]
    assert (a["aa"], a["mixup"], a["cutmix"], a["reprob"], a["smoothing"], a["drop_path"], a["weight_decay"]) == (
        "rand-m9-mstd0.5-inc1", 0.8, 1.0, 0.25, 0.1, 0.1, 0.05,
    )  # fmt: skip
    groups = saved["optimizer"]["param_groups"]
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.05]
    assert all(g["eps"] == 1e-8 and g["initial_lr"] == pytest.approx(1.5e-4 * 8 / 256) for g in groups)
    lrs = [s["lr"] for s in read_jsonl(out / "steps.jsonl")]  # the lr each update used
    assert lrs[0] == 0.0 and lrs[7] == pytest.approx(7 / 8 * 1.5e-4 * 8 / 256)  # linear warm-up over 8 updates
    assert lrs[8] == pytest.approx(1.5e-4 * 8 / 256) and all(a > b for a, b in zip(lrs[8:], lrs[9:]))  # cosine
    assert history[-1]["lr"] == pytest.approx(1e-6)


def test_finetune_from_a_checkpoint_with_another_class_count(full_run, tmp_path):
    three = make_image_folder(tmp_path / "three", {k: COLOURS[k] for k in ("red", "green", "blue")}, n_train=8, n_val=2)
    out = tmp_path / "ft"
    history = train.main(
        [*EASY, "--data-dir", str(three), "--output-dir", str(out), "--epochs", "1", "--workers", "0",
         "--recipe", "in1k-ft-384", "--finetune", str(full_run / "checkpoint-last.pth")]
    )  # fmt: skip
    assert len(history) == 1 and "ema_top1" not in history[0]  # the fine-tuning recipe has no EMA
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert ckpt["model"]["head.weight"].shape == (3, 768)
    assert ckpt["args"]["weight_decay"] == 1e-8 and ckpt["args"]["mixup"] == 0.0  # the recipe's


@pytest.mark.parametrize("layout", ["ours", "released"])
def test_load_finetune_keeps_the_backbone_and_reinitialises_a_new_head(full_run, tmp_path, layout):
    source = torch.load(full_run / "checkpoint-last.pth", weights_only=True)["model"]
    path = full_run / "checkpoint-last.pth"
    if layout == "released":  # as the authors' script saves: under "model", from DDP
        path = tmp_path / "released.pth"
        torch.save({"model": {f"module.{k}": v for k, v in source.items()}}, path)
    torch.manual_seed(1)
    model = train.MODELS["restv2_tiny"](num_classes=10)
    head = model.head.weight.detach().clone()
    assert train.load_finetune(model, str(path)) == ["head.weight", "head.bias"]
    for name, value in model.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(value, source[name]), name
    assert torch.equal(model.head.weight, head)

    same = train.MODELS["restv2_tiny"](num_classes=4)
    assert train.load_finetune(same, str(path)) == []
    assert torch.equal(same.head.weight, source["head.weight"])
    with pytest.raises(ValueError, match="does not match"):
        train.load_finetune(train.MODELS["restv2_small"](num_classes=4), str(path))


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    build = train.build_model
    calls = []

    def poisoned(args):  # the 11th training forward (epoch 2 of 8 updates) returns NaN
        model = build(args)

        def hook(module, inputs, output):
            if module.training:
                calls.append(1)
                if len(calls) == 11:
                    return output * float("nan")
            return output

        model.head.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train, "build_model", poisoned)
    out = tmp_path / "out"
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) in epoch 2, batch 2.*checkpoint-last.pth"):
        train.main([*EASY, "--data-dir", str(data_dir), "--output-dir", str(out), "--workers", "0", "--epochs", "3"])
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert [m["epoch"] for m in read_jsonl(out / "log.jsonl")] == [1]


def test_save_atomic_leaves_the_previous_file_when_interrupted(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint-last.pth")
    train.save_atomic({"epoch": 1}, path)
    real_save = torch.save

    def killed(obj, f):
        real_save(obj, f)
        f.truncate(10)  # half-written, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        train.save_atomic({"epoch": 2}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["checkpoint-last.pth"]


def test_a_corrupt_image_stops_both_processes_with_its_name(data_dir, tmp_path):
    broken = tmp_path / "images"
    make_image_folder(broken)
    bad = broken / "train" / "green" / "3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    start = time.monotonic()
    code, output = finish(
        torchrun([*EASY, "--data-dir", str(broken), "--output-dir", str(tmp_path / "out"), "--workers", "0"])
    )
    assert code != 0
    assert f"cannot read image '{bad}'" in output
    assert time.monotonic() - start < TIMEOUT


def test_an_empty_class_folder_is_named(data_dir, tmp_path):
    images = make_image_folder(tmp_path / "images")
    (images / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match=r"class folder\(s\) 'empty' hold no image"):
        train.main([*EASY, "--data-dir", str(images), "--output-dir", str(tmp_path / "out")])
    (images / "train" / "empty").rmdir()
    (images / "val" / "purple").mkdir()
    (images / "val" / "purple" / "0.png").write_bytes((images / "val" / "red" / "0.png").read_bytes())
    with pytest.raises(ValueError, match=r"does not have the training set's classes: missing \[\], extra \['purple'\]"):
        train.main([*EASY, "--data-dir", str(images), "--output-dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="does not exist"):
        train.main([*EASY, "--data-dir", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "out")])


def test_argument_errors(full_run, data_dir, capsys):
    base = [*EASY, "--data-dir", str(data_dir)]
    for extra, message in [
        (["--batch-size", "7", "--mixup", "0.8"], "--batch-size must be even"),
        (["--recipe", "in1k-ft-384"], "give --finetune"),
        (["--img-size", "16"], "at least 32"),
        (["--warmup-epochs", "5"], "--warmup-epochs must be between 0 and --epochs"),
    ]:
        with pytest.raises(SystemExit):
            train.parse_args([*base, *extra])
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="already holds a run"):
        train.main([*base, "--output-dir", str(full_run)])
    with pytest.raises(ValueError, match="is not a restv2.train checkpoint"):
        torch.save({"model": {}}, full_run.parent / "weights.pth")
        train.main(
            [*base, "--output-dir", str(full_run.parent / "x"), "--resume", str(full_run.parent / "weights.pth")]
        )


def test_validate_reproduces_the_training_log(full_run, data_dir, tmp_path):
    last = read_jsonl(full_run / "log.jsonl")[-1]
    script = Path(sys.executable).parent / "restv2-validate"  # the console script
    command = [str(script)] if script.exists() else [sys.executable, "-m", "restv2.validate"]
    result = subprocess.run(
        [*command, "--checkpoint", str(full_run / "checkpoint-last.pth"), "--data-dir", str(data_dir), "--workers", "0",
         "--device", "cpu"],
        capture_output=True, text=True, timeout=TIMEOUT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert (metrics["top1"], metrics["top5"], metrics["images"]) == (last["val_top1"], last["val_top5"], 16)
    assert metrics["loss"] == pytest.approx(last["val_loss"], rel=1e-5)  # summed over 2 processes in training

    ema = validate.main(
        [
            "--checkpoint",
            str(full_run / "checkpoint-last.pth"),
            "--data-dir",
            str(data_dir),
            "--ema",
            "--workers",
            "0",
            "--device",
            "cpu",
        ]
    )
    assert ema["top1"] == last["ema_top1"]

    released = tmp_path / "restv2_tiny_released.pth"
    weights = torch.load(full_run / "checkpoint-last.pth", weights_only=True)["model"]
    torch.save({"model": {f"module.{k}": v for k, v in weights.items()}}, released)
    again = validate.main(
        ["--checkpoint", str(released), "--model", "restv2_tiny", "--img-size", "32",
         "--data-dir", str(data_dir / "val"), "--workers", "0", "--device", "cpu"]
    )  # fmt: skip
    assert again["top1"] == last["val_top1"]
    with pytest.raises(ValueError, match="give --model"):
        validate.main(["--checkpoint", str(released), "--data-dir", str(data_dir)])


def _readme_train_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = [c for b in blocks for c in b.replace("\\\n", " ").splitlines() if "restv2.train" in c]
    return [shlex.split(c) for c in commands]


def test_a_process_without_a_gpu_of_its_own_is_named(monkeypatch):
    """torchrun with more processes than GPUs (rank 1 on a one-GPU machine): a ValueError that says
    so, not a CUDA error from set_device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"cuda:1 is not there: this machine has 1 CUDA device"):
        validate.setup()


def test_readme_training_commands_parse_with_the_published_global_batch():
    commands = _readme_train_commands()
    assert len(commands) == 3  # one GPU, 8 GPUs, fine-tuning
    for words in commands:
        processes = int(words[words.index("--nproc-per-node") + 1]) if words[0] == "torchrun" else 1
        args = train.parse_args(words[words.index("restv2.train") + 1 :])
        global_batch = args.batch_size * args.accum_steps * processes
        if args.recipe == "in1k":
            assert global_batch == 2048 and args.base_lr == 1.5e-4 and args.epochs == 300
        else:
            assert global_batch == 512 and args.base_lr == 1.5e-5 and args.img_size == 384 and args.finetune
