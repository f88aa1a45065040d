"""The fit loop: `train(TrainConfig(...))` writes a run folder and returns a `TrainResult`."""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgeft import __version__
from edgeft.checkpoint import load_checkpoint, save_checkpoint
from edgeft.config import AUGMENTATIONS, OPTIMIZERS, SCHEDULERS, TrainConfig
from edgeft.data import DataBundle, TensorImages, iterate_batches, load_data
from edgeft.devices import torch_device
from edgeft.distributed import Dist, init_distributed
from edgeft.errors import InputError
from edgeft.models import backbone_bn_eval, freeze_backbone, get_model, head_name, list_models
from edgeft.plots import plot_training_curves

__all__ = ["TrainConfig", "TrainResult", "evaluate", "train"]

log = logging.getLogger(__name__)

@dataclass
class TrainResult:
    """What a finished run reports (also written as summary.json)."""

    run_dir: str
    best_checkpoint: str
    best_val_acc: float
    best_epoch: int
    epochs: int  # epochs completed
    stopped_early: bool
    train_images_per_s: float
    wall_s: float
    skipped_files: int
    device: str
    params: int
    world_size: int = 1  # processes that trained together (torchrun)
    history: list[dict] = field(default_factory=list, repr=False)


def _check(config: TrainConfig) -> None:
    if config.model not in list_models():
        get_model(config.model, num_classes=2)  # raises the unknown-model error with the list
    choices = {"optimizer": OPTIMIZERS, "scheduler": SCHEDULERS, "augment": AUGMENTATIONS}
    for key, allowed in choices.items():
        if getattr(config, key) not in allowed:
            raise InputError(f"--{key} must be one of {', '.join(allowed)}, got {getattr(config, key)!r}")
    if config.epochs < 1 or config.batch_size < 1:
        raise InputError("--epochs and --batch-size must be at least 1")
    if not 0 <= config.freeze_epochs < config.epochs:
        raise InputError(f"--freeze-epochs must be between 0 and epochs-1 ({config.epochs - 1})")
    if config.freeze_epochs and config.weights == "none":
        raise InputError("--freeze-epochs needs pretrained --weights (a random backbone gains nothing from freezing)")
    if not 0 <= config.label_smoothing < 1:
        raise InputError("--label-smoothing must be in [0, 1)")


def _new_run_dir(config: TrainConfig) -> Path:
    base = config.name or f"{config.model}-{Path(config.data).name or 'data'}"
    parent = Path(config.out)
    run_dir, n = parent / base, 1
    while run_dir.exists():
        n += 1
        run_dir = parent / f"{base}-{n}"
    run_dir.mkdir(parents=True)
    return run_dir


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Two groups: weights with decay, biases and normalization parameters without."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    lr = config.resolved_lr()
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=True)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


def _lr_factor(config: TrainConfig, steps_per_epoch: int):
    """Learning-rate multiplier per optimizer step: warm-up then cosine, restarted at the unfreeze
    point and scaled by `unfreeze_lr_scale` after it. Rebuilt from the config on resume."""
    freeze_steps = config.freeze_epochs * steps_per_epoch
    total_steps = config.epochs * steps_per_epoch

    def factor(step: int) -> float:
        scale, start, end = (1.0, 0, freeze_steps) if step < freeze_steps else (
            config.unfreeze_lr_scale if freeze_steps else 1.0, freeze_steps, total_steps)  # fmt: skip
        if config.scheduler != "cosine":
            return scale
        warmup = min(config.warmup_epochs * steps_per_epoch, (end - start) / 2)
        t = step - start
        if t < warmup:
            return scale * (t + 1) / (warmup + 1)
        progress = (t - warmup) / max(1.0, end - start - warmup)
        return scale * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    return factor


def _autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    use_amp = config.amp if config.amp is not None else device.type == "cuda"
    if not use_amp:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def evaluate(
    model: nn.Module, bundle: DataBundle, *, device: torch.device, batch_size: int = 256, autocast_dtype=None,
    channels_last: bool = False, dist: Dist = Dist(),
) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy on the validation split (each rank takes a share)."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with torch.inference_mode(), autocast:
        batches = iterate_batches(bundle.val, batch_size=batch_size, preprocess=bundle.preprocess, device=device,
                                  rank=dist.rank, world=dist.world, pad=False)  # fmt: skip
        for x, y in batches:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
    loss_sum, correct = dist.sum(loss_sum, correct)
    n = len(bundle.val)
    return loss_sum.item() / n, correct.item() / n


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[metrics]}"),
        console=Console(stderr=True),
        disable=not enabled,
    )


def train(config: TrainConfig, *, resume: str | Path | None = None, progress: bool = False) -> TrainResult:
    """Train `config.model` on `config.data`; with `resume` (a run folder or its last.pt), continue
    that run where it stopped, with its own config."""
    started = time.perf_counter()
    state = None
    if resume is not None:
        last = Path(resume) / "last.pt" if Path(resume).is_dir() else Path(resume)
        state = load_checkpoint(last)
        if "resume" not in state:
            raise InputError(f"{last} has no resume state (resume from a run's last.pt)")
        known = {f.name for f in fields(TrainConfig)}
        config = TrainConfig(**{k: v for k, v in state["config"].items() if k in known})
        run_dir = last.parent
    _check(config)
    ctx, device = init_distributed(torch_device(config.device))
    if config.batch_size % ctx.world:
        raise InputError(f"--batch-size {config.batch_size} does not split evenly over {ctx.world} processes")
    if config.sync_bn and ctx.world > 1 and device.type != "cuda":
        raise InputError("--sync-bn needs CUDA devices")
    batch_size = config.batch_size // ctx.world  # per rank
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    bundle = load_data(
        config.data, root=config.data_root, img_size=config.img_size, channels=config.channels,
        val_split=config.val_split, seed=config.seed, max_bad_fraction=config.max_bad_fraction,
    )  # fmt: skip
    in_chans = bundle.preprocess.channels
    if device.type == "cuda" and isinstance(bundle.train, TensorImages):  # the whole dataset lives on the GPU
        bundle.train = TensorImages(bundle.train.images.to(device), bundle.train.labels.to(device))
        bundle.val = TensorImages(bundle.val.images.to(device), bundle.val.labels.to(device))
    weights = config.weights if state is None else "none"  # resumed weights come from last.pt
    model = get_model(config.model, num_classes=len(bundle.classes), in_chans=in_chans, weights=weights,
                      stem=config.stem).to(device)  # fmt: skip
    channels_last = config.channels_last if config.channels_last is not None else device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.sync_bn and ctx.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    autocast_dtype = _autocast_dtype(config, device)
    optimizer = _optimizer(config, model)
    steps_per_epoch = math.ceil(math.ceil(len(bundle.train) / ctx.world) / batch_size)
    lambda_lr = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config, steps_per_epoch))
    plateau = (
        torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.2, patience=max(1, config.patience // 2))
        if config.scheduler == "plateau" else None
    )  # fmt: skip
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    history: list[dict] = []
    step_losses: list[float] = []
    best = {"val_acc": -1.0, "val_loss": math.inf, "epoch": 0}
    lowest_val_loss, stale_epochs, start_epoch, previous_wall = math.inf, 0, 0, 0.0
    if state is None:
        run_dir = _new_run_dir(config) if ctx.is_main else None
    else:
        model.load_state_dict(state["state_dict"])
        r = state["resume"]
        _restore_trainers(r, optimizer, lambda_lr, plateau, scaler, device)
        history, step_losses, best = r["history"], r["step_losses"], r["best"]
        lowest_val_loss, stale_epochs, start_epoch = r["lowest_val_loss"], r["stale_epochs"], r["epoch"]
        previous_wall = r["wall_s"]
        log.warning("resuming %s at epoch %d with its saved config (other options are ignored)", run_dir, start_epoch + 1)
    if ctx.is_main:
        (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")

    meta = {
        "arch": config.model,
        "num_classes": len(bundle.classes),
        "in_chans": in_chans,
        "stem": config.stem,
        "classes": list(bundle.classes),
        "preprocess": bundle.preprocess.to_dict(),
        "config": asdict(config),
        "edgeft_version": __version__,
        "torch_version": str(torch.__version__),
    }
    head = head_name(model)
    stopped_early = False
    phase = None  # frozen backbone (True) or not (False) in the current epoch
    with _progress(progress and ctx.is_main) as bar:
        for epoch in range(start_epoch, config.epochs):
            frozen = epoch < config.freeze_epochs
            if plateau is not None and config.freeze_epochs and epoch == config.freeze_epochs:
                for group in optimizer.param_groups:
                    group["lr"] *= config.unfreeze_lr_scale
            if frozen != phase:  # wrap again only when the set of trained parameters changes
                freeze_backbone(model, frozen)
                net = ctx.wrap(model, device)  # DDP syncs the parameters that train in this phase
                net = torch.compile(net) if config.compile else net
                phase = frozen
            model.train()
            if frozen:
                backbone_bn_eval(model)
                model.get_submodule(head).train()
            task = bar.add_task(f"epoch {epoch + 1}/{config.epochs}" + (" (head)" if frozen else ""),
                                total=steps_per_epoch, metrics="")  # fmt: skip
            epoch_start = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.int64)
            losses = []
            seen = 0
            batches = iterate_batches(
                bundle.train, batch_size=batch_size, preprocess=bundle.preprocess, device=device,
                shuffle=True, augment=config.augment, flips=bundle.flips, seed=config.seed * 100_003 + epoch,
                workers=config.workers, rank=ctx.rank, world=ctx.world,
            )  # fmt: skip
            for step, (x, y) in enumerate(batches, 1):
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
                with autocast:
                    logits = net(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                lambda_lr.step()
                loss = loss.detach()
                losses.append(loss)
                loss_sum += loss * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
                if progress and (step % 10 == 0 or step == steps_per_epoch):  # a sync every 10 steps only
                    rate = seen / (time.perf_counter() - epoch_start)
                    metrics = f"loss {loss_sum.item() / seen:.4f}  acc {correct.item() / seen:.2%}  {rate:,.0f} img/s"
                    bar.update(task, completed=step, metrics=metrics)
            train_seconds = time.perf_counter() - epoch_start
            ctx.sync_buffers(model)
            loss_sum, correct, seen_all = ctx.sum(loss_sum, correct, torch.tensor(float(seen), device=device))
            seen = int(seen_all.item())
            val_loss, val_acc = evaluate(model, bundle, device=device, autocast_dtype=autocast_dtype,
                                         channels_last=channels_last, dist=ctx)  # fmt: skip
            if plateau is not None:
                plateau.step(val_loss)
            step_losses += torch.stack(losses).tolist()
            row = {
                "epoch": epoch + 1,
                "phase": "head" if frozen else "all",
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": loss_sum.item() / seen,
                "train_acc": correct.item() / seen,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "seconds": time.perf_counter() - epoch_start,
                "images_per_s": seen / train_seconds,
            }
            history.append(row)
            bar.update(task, metrics=f"{bar.tasks[task].fields['metrics']}  val_loss {val_loss:.4f}  val_acc {val_acc:.2%}")
            if (val_acc, -val_loss) > (best["val_acc"], -best["val_loss"]):
                best = {"val_acc": val_acc, "val_loss": val_loss, "epoch": epoch + 1}
                if ctx.is_main:
                    save_checkpoint(run_dir / "best.pt", {**meta, "metrics": best, "state_dict": model.state_dict()})
            if val_loss < lowest_val_loss:
                lowest_val_loss, stale_epochs = val_loss, 0
            else:
                stale_epochs += 1
            stopped_early = bool(config.patience) and stale_epochs >= config.patience and epoch + 1 < config.epochs
            if not ctx.is_main:  # the other ranks write nothing
                if stopped_early:
                    break
                continue
            resume_state = {
                **_trainers_state(optimizer, lambda_lr, plateau, scaler, device),
                "epoch": epoch + 1 if not stopped_early else config.epochs,
                "history": history,
                "step_losses": step_losses,
                "best": best,
                "lowest_val_loss": lowest_val_loss,
                "stale_epochs": stale_epochs,
                "wall_s": previous_wall + time.perf_counter() - started,
            }
            save_checkpoint(run_dir / "last.pt", {**meta, "metrics": row, "state_dict": model.state_dict(), "resume": resume_state})
            _write_history(run_dir / "history.csv", history)
            plot_training_curves(history, step_losses, run_dir / "curves.png", title=f"{config.model} on {bundle.name}")
            if stopped_early:
                log.info("early stop: val loss has not improved for %d epochs", stale_epochs)
                break

    ranks_identical = ctx.identical(model)
    ctx.close()
    result = TrainResult(
        run_dir=str(run_dir) if ctx.is_main else "",
        best_checkpoint=str(run_dir / "best.pt") if ctx.is_main else "",
        best_val_acc=best["val_acc"],
        best_epoch=best["epoch"],
        epochs=len(history),
        stopped_early=stopped_early,
        train_images_per_s=len(history) / max(1e-9, sum(1 / r["images_per_s"] for r in history)),  # all images / all time
        wall_s=previous_wall + time.perf_counter() - started,
        skipped_files=bundle.skipped_files,
        device=str(device),
        params=sum(p.numel() for p in model.parameters()),
        world_size=ctx.world,
        history=history,
    )
    if not ctx.is_main:
        return result
    if not ranks_identical:
        log.error("the %d ranks ended with different weights", ctx.world)
    summary = {k: v for k, v in asdict(result).items() if k != "history"}
    summary["ranks_identical"] = ranks_identical
    summary.update(model=config.model, data=bundle.name, classes=list(bundle.classes),
                   skipped_examples=list(bundle.skipped_examples))  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return result


def _trainers_state(optimizer, lambda_lr, plateau, scaler, device: torch.device) -> dict:
    """Optimizer, schedulers, loss scaler and RNG states: what `--resume` restores."""
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": lambda_lr.state_dict(),
        "plateau": plateau.state_dict() if plateau is not None else None,
        "scaler": scaler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
        "rng_python": random.getstate(),
    }


def _restore_trainers(saved: dict, optimizer, lambda_lr, plateau, scaler, device: torch.device) -> None:
    """The inverse of `_trainers_state`."""
    optimizer.load_state_dict(saved["optimizer"])
    lambda_lr.load_state_dict(saved["scheduler"])
    if plateau is not None:
        plateau.load_state_dict(saved["plateau"])
    scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["rng_cpu"])
    if device.type == "cuda" and saved["rng_cuda"]:
        torch.cuda.set_rng_state_all(saved["rng_cuda"])
    random.setstate(saved["rng_python"])


def _write_history(path: Path, history: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
