"""The fit loop as phases: build, enter phase (freeze / unfreeze, wrap, compile), one epoch,
evaluate, checkpoint, finish. `train(TrainConfig(...))` writes a run folder and returns a
`TrainResult`; `resume(run_dir)` continues (or extends) one from its last.pt."""

from __future__ import annotations

import csv
import io
import logging
import math
import random
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeft import __version__, jsonio
from edgeft.checkpoint import load_checkpoint, save_checkpoint
from edgeft.config import TrainConfig
from edgeft.cpu import has_bf16, load_average, use_threads
from edgeft.data import BUILTIN_DATASETS, DataBundle, FolderLoaders, TensorImages, iterate_batches, load_data
from edgeft.devices import torch_device
from edgeft.distributed import Dist, init_distributed
from edgeft.errors import InputError, NothingToDo
from edgeft.interrupts import atomic_write_text, deferred_interrupts, remove_dead_temporaries
from edgeft.models import backbone_bn_eval, freeze_backbone, get_model, head_name, list_models
from edgeft.plots import plot_training_curves
from edgeft.progress import bar as progress_bar
from edgeft.progress import say

__all__ = [
    "LearningRate",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "autocast_dtype",
    "check_inputs",
    "check_unfinished",
    "evaluate",
    "resume",
    "train",
]

log = logging.getLogger(__name__)

PLATEAU_THRESHOLD = 1e-4  # plateau: a val loss lower by less than this fraction counts as flat (as torch's)


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
    skipped_files: int  # left out at start-up or found unreadable while training / evaluating
    device: str
    params: int
    world_size: int = 1  # processes that trained together (torchrun)
    img_size: int = 0  # the input side the model trained at
    img_size_from_data: bool = False  # chosen from the folder's image sizes (no --img-size given)
    threads: int = 0  # torch's intra-op threads (results depend on it: see the README)
    history: list[dict] = field(default_factory=list, repr=False)


# --- the learning rate ------------------------------------------------------------------------


class LearningRate:
    """The one owner of the learning rate: base rate x phase scale (1 while frozen, then
    `unfreeze_lr_scale`) x a linear warm-up at the start of each phase x the schedule (cosine
    over the phase, plateau cuts on a flat val loss, or none). `apply` sets it before each step."""

    def __init__(self, config: TrainConfig, steps_per_epoch: int):
        self.config, self.steps_per_epoch = config, steps_per_epoch
        self.base = config.resolved_lr()
        self.plateau = {"best": math.inf, "flat": 0, "scale": 1.0}  # restarted at the unfreeze point

    def at(self, step: int) -> float:
        """The rate of optimizer step `step` (0-based, counted over the whole run)."""
        c, freeze_steps = self.config, self.config.freeze_epochs * self.steps_per_epoch
        start, end, scale = (
            (0, freeze_steps, 1.0)
            if step < freeze_steps
            else (freeze_steps, c.epochs * self.steps_per_epoch, c.unfreeze_lr_scale if freeze_steps else 1.0)
        )
        warmup, t = min(c.warmup_epochs * self.steps_per_epoch, (end - start) / 2), step - start
        if t < warmup:
            return self.base * scale * (t + 1) / (warmup + 1)
        if c.scheduler == "cosine":
            progress = min(1.0, (t - warmup) / max(1.0, end - start - warmup))
            return self.base * scale * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))
        if c.scheduler == "plateau":
            return self.base * scale * self.plateau["scale"]
        return self.base * scale

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        rate = self.at(step)
        for group in optimizer.param_groups:
            group["lr"] = rate
        return rate

    def end_epoch(self, epoch: int, val_loss: float) -> None:
        """Plateau bookkeeping after epoch `epoch` (0-based): `plateau_patience` epochs without
        a val loss lower by PLATEAU_THRESHOLD cut the rate by `plateau_factor`."""
        p = self.plateau
        if val_loss < p["best"] * (1 - PLATEAU_THRESHOLD) or p["best"] == math.inf:
            p["best"], p["flat"] = val_loss, 0
        else:
            p["flat"] += 1
        if p["flat"] >= self.config.plateau_patience:
            p["scale"], p["flat"] = p["scale"] * self.config.plateau_factor, 0
        if epoch + 1 == self.config.freeze_epochs:  # the unfrozen phase starts its own plateau
            self.plateau = {"best": math.inf, "flat": 0, "scale": 1.0}

    def state_dict(self) -> dict:
        return dict(self.plateau)

    def load_state_dict(self, state: dict) -> None:
        self.plateau = dict(state)


# --- the state of a run -------------------------------------------------------------------------


@dataclass
class TrainState:
    """Everything that changes while a run trains; `state_dict` is last.pt's resume entry and
    `load_state_dict` puts all of it back (weights, optimizer, rate, scaler, RNGs, progress)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr: LearningRate
    scaler: torch.amp.GradScaler
    epoch: int = 0  # epochs completed
    history: list[dict] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"val_acc": -1.0, "val_loss": math.inf, "epoch": 0})
    lowest_val_loss: float = math.inf
    stale_epochs: int = 0
    stopped_early: bool = False
    wall_s: float = 0.0  # training time of earlier processes of this run

    _PROGRESS = ("epoch", "history", "step_losses", "best", "lowest_val_loss", "stale_epochs", "stopped_early")

    def state_dict(self, *, wall_s: float) -> dict:
        return {
            **{name: getattr(self, name) for name in self._PROGRESS},
            "wall_s": wall_s,
            "optimizer": self.optimizer.state_dict(),
            "lr": self.lr.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "rng_python": random.getstate(),
        }

    def load_state_dict(self, checkpoint: dict) -> None:
        """Restore from a last.pt's content (its weights and its resume entry)."""
        saved = checkpoint["resume"]
        self.model.load_state_dict(checkpoint["state_dict"])
        for name in self._PROGRESS:
            setattr(self, name, saved.get(name, getattr(self, name)))
        self.wall_s = saved["wall_s"]
        self.optimizer.load_state_dict(saved["optimizer"])
        self.lr.load_state_dict(saved.get("lr", self.lr.state_dict()))
        self.scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["rng_cpu"])
        if saved["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng_cuda"])
        random.setstate(saved["rng_python"])


@dataclass
class _Run:
    """A run being trained: what the phases share."""

    config: TrainConfig
    ctx: Dist
    device: torch.device
    bundle: DataBundle
    state: TrainState
    run_dir: Path | None  # None on torchrun ranks other than 0
    meta: dict
    batch_size: int  # per rank
    steps_per_epoch: int
    autocast: torch.dtype | None
    channels_last: bool
    started: float
    loaders: FolderLoaders = field(default_factory=FolderLoaders)  # folder data: workers kept until the run ends
    net: nn.Module | None = None  # the model as trained now (DDP-wrapped, compiled)
    frozen: bool | None = None  # the phase `net` was built for
    load_average: float | None = field(default_factory=load_average)  # at start: above the cores, speed suffered

    def elapsed(self) -> float:
        return self.state.wall_s + time.perf_counter() - self.started


# --- entry points -------------------------------------------------------------------------------


def train(config: TrainConfig, *, progress: bool = False) -> TrainResult:
    """Train `config.model` on `config.data` into a new run folder."""
    return _fit(config, checkpoint=None, run_dir=None, progress=progress)


def resume(run_dir: str | Path, *, epochs: int | None = None, progress: bool = False) -> TrainResult:
    """Continue the run in `run_dir` (or the run of a last.pt) where it stopped, with its own
    config; `epochs` above the run's own extends it (also a finished or early-stopped run)."""
    last, checkpoint = _read_last(run_dir)
    _check_own_folder(last, checkpoint)
    known = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in checkpoint["config"].items() if k in known})
    if epochs is not None and epochs != config.epochs:
        done = checkpoint["resume"].get("epoch", 0)
        if epochs < done:
            raise InputError(f"--epochs {epochs}: {last.parent} has already trained {done} epochs")
        config = replace(config, epochs=epochs)
        checkpoint["resume"].update(stopped_early=False, stale_epochs=0)
        log.info("extending %s to %d epochs", last.parent, epochs)
    return _fit(config, checkpoint=checkpoint, run_dir=last.parent, progress=progress)


def _summary_epochs(run_dir: Path) -> int | None:
    """The epochs the run folder's summary.json reports (None: no readable summary)."""
    try:
        return jsonio.loads((run_dir / "summary.json").read_text())["epochs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_unfinished(run_dir: str | Path, *, epochs: int | None = None) -> None:
    """Raise NothingToDo (one line, exit 0, how to extend) when resuming `run_dir` would do
    nothing: the run finished or stopped early and wrote its summary, and `epochs` does not extend
    it. A run stopped after its last epoch but before its summary is finished by the resume."""
    last, checkpoint = _read_last(run_dir)
    state, planned = checkpoint["resume"], checkpoint["config"].get("epochs")
    done = state.get("epoch", 0)
    ended = (done >= planned or state.get("stopped_early")) and _summary_epochs(last.parent) == done
    if (epochs is None or epochs == planned) and ended:
        how = "stopped early" if state.get("stopped_early") else "finished"
        raise NothingToDo(
            f"{last.parent} already {how} after {done} of {planned} epochs; nothing to resume "
            f"(to train longer: edgeft train --resume {last.parent} --epochs N, N > {done})"
        )


def check_inputs(config: TrainConfig) -> None:
    """Everything a run reads, checked before any output: the model, the weights (loaded), the data."""
    if config.model not in list_models():
        get_model(config.model, num_classes=2)  # raises the unknown-model error with the list
    if config.data not in BUILTIN_DATASETS and not Path(config.data).is_dir():
        raise InputError(f"--data {config.data!r} is neither a folder nor one of: {', '.join(BUILTIN_DATASETS)}")
    if config.weights != "none":
        get_model(config.model, num_classes=2, weights=config.weights, stem=config.stem)


def _read_last(source: str | Path) -> tuple[Path, dict]:
    last = Path(source) / "last.pt" if Path(source).is_dir() else Path(source)
    checkpoint = load_checkpoint(last)
    if "resume" not in checkpoint:
        raise InputError(f"{last} has no resume state (resume from a run's last.pt)")
    return last, checkpoint


def _check_own_folder(last: Path, checkpoint: dict) -> None:
    """Refuse a last.pt that is not the run of its folder (resuming it would overwrite that run's
    config.json and summary.json beside another run's best.pt)."""
    reason = _foreign(last.parent, checkpoint)
    if reason:
        raise InputError(
            f"{last} does not belong to the run in {last.parent}: {reason}; "
            f"resume from the folder the run was trained in"
        )


def _foreign(folder: Path, checkpoint: dict) -> str | None:
    """Why `checkpoint` (a last.pt) is from another run than `folder`'s config.json and best.pt,
    or None. Its run id decides; a last.pt from before run ids is judged by its config, its best
    epoch and the folder name it was trained in."""
    config, run_id = checkpoint["config"], checkpoint.get("run_id")
    saved = folder / "config.json"
    if saved.is_file() and _without_epochs(_read_json(saved)) != _without_epochs(config):
        return "its config differs from config.json"
    if (folder / "best.pt").is_file():
        best = load_checkpoint(folder / "best.pt")
        if run_id and best.get("run_id"):
            if best["run_id"] != run_id:
                return "best.pt is from another run"
        elif not _same_best(checkpoint["resume"], best.get("metrics", {})):
            return "its best epoch is not the one of best.pt"
    base = config.get("name") or f"{config.get('model')}-{Path(config.get('data', '')).name or 'data'}"
    numbered = folder.name.removeprefix(f"{base}-")
    if not run_id and folder.name != base and not (numbered.isdigit() and numbered != folder.name):
        return f"it was trained in a folder named {base!r}"
    return None


def _without_epochs(config: dict) -> dict:
    return {key: value for key, value in config.items() if key != "epochs"}  # --epochs extends a run


def _read_json(path: Path) -> dict:
    try:
        return jsonio.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not readable ({exc})") from None


def _same_best(resume: dict, best: dict) -> bool:
    """best.pt's metrics are last.pt's best, or (saved just before a stop) those of the next epoch."""
    return resume.get("best") == best or best.get("epoch") == resume.get("epoch", 0) + 1


def _fit(config: TrainConfig, *, checkpoint: dict | None, run_dir: Path | None, progress: bool) -> TrainResult:
    run = _build(config, checkpoint, run_dir)
    with run.loaders, progress_bar(progress and run.ctx.is_main) as bar:
        for epoch in range(run.state.epoch, config.epochs):
            if run.state.stopped_early:
                break
            _enter_phase(run, epoch)
            train_metrics = _one_epoch(run, epoch, bar)
            val_loss, val_acc = evaluate(
                run.state.model,
                run.bundle,
                device=run.device,
                autocast_dtype=run.autocast,
                channels_last=run.channels_last,
                dist=run.ctx,
                workers=config.workers,
                loaders=run.loaders,
            )
            row = _end_epoch(run, epoch, train_metrics, val_loss, val_acc)
            bar.update(
                bar.task_ids[-1],
                metrics=f"{bar.tasks[-1].fields['metrics']}  val_loss {val_loss:.4f}  val_acc {val_acc:.2%}",
            )
            _checkpoint(run, row, improved=run.state.best["epoch"] == epoch + 1)
    return _finish(run)


# --- build --------------------------------------------------------------------------------------


def _build(config: TrainConfig, checkpoint: dict | None, run_dir: Path | None) -> _Run:
    """Model, optimizer, learning rate, scaler, data and distributed context; the saved state
    of a resumed run; the run folder (created last, after every input was read)."""
    started = time.perf_counter()
    if config.model not in list_models():
        get_model(config.model, num_classes=2)  # the unknown-model error, with the list
    ctx, device = init_distributed(torch_device(config.device))
    if config.batch_size % ctx.world:
        raise InputError(f"--batch-size {config.batch_size} does not split evenly over {ctx.world} processes")
    if config.sync_bn and ctx.world > 1 and device.type != "cuda":
        raise InputError("--sync-bn needs CUDA devices")
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    bundle = _load_bundle(config, device)
    config = _resolved(config, bundle, device)
    model = _build_model(config, bundle, device, weights="none" if checkpoint else config.weights)
    channels_last = config.channels_last
    if channels_last:
        model.to(memory_format=torch.channels_last)
    batch_size = config.batch_size // ctx.world
    steps_per_epoch = math.ceil(math.ceil(len(bundle.train) / ctx.world) / batch_size)
    dtype = autocast_dtype(device, config.amp)
    state = TrainState(
        model,
        _optimizer(config, model),
        LearningRate(config, steps_per_epoch),
        torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
    )
    if checkpoint is not None:
        state.load_state_dict(checkpoint)
        log.info("resuming %s at epoch %d", run_dir, state.epoch + 1)
        say(f"edgeft: resuming {run_dir} at epoch {state.epoch + 1} of {config.epochs}")
    if ctx.is_main and run_dir is not None:  # resumed: what a killed write left goes
        for stale in remove_dead_temporaries(run_dir):
            log.info("removed %s, left by a write that was killed", stale)
    if ctx.is_main:
        run_dir = run_dir or _new_run_dir(config)
        atomic_write_text(run_dir / "config.json", jsonio.dumps(asdict(config), indent=2) + "\n")
    run_id = (checkpoint or {}).get("run_id") or uuid.uuid4().hex
    return _Run(
        config,
        ctx,
        device,
        bundle,
        state,
        run_dir if ctx.is_main else None,
        _meta(config, bundle, run_id),
        batch_size,
        steps_per_epoch,
        dtype,
        channels_last,
        started,
    )


def _load_bundle(config: TrainConfig, device: torch.device) -> DataBundle:
    """The data; folders without --img-size train at 224 from ImageNet weights, else at a size
    chosen from their images. In-memory data moves to the GPU whole."""
    img_size = config.img_size
    if img_size is None and config.weights == "imagenet" and config.data not in BUILTIN_DATASETS:
        img_size = 224
    bundle = load_data(
        config.data,
        root=config.data_root,
        img_size=img_size,
        channels=config.channels,
        val_split=config.val_split,
        seed=config.seed,
        max_bad_fraction=config.max_bad_fraction,
    )
    if bundle.size_from_data:
        log.info("image size %d px, from the data (median shorter side; --img-size to choose)", bundle.preprocess.size)
    if device.type == "cuda" and isinstance(bundle.train, TensorImages):
        bundle.train = TensorImages(bundle.train.images.to(device), bundle.train.labels.to(device))
        bundle.val = TensorImages(bundle.val.images.to(device), bundle.val.labels.to(device))
    return bundle


def _resolved(config: TrainConfig, bundle: DataBundle, device: torch.device) -> TrainConfig:
    """The config as it runs: the chosen image size, learning rate, autocast, layout and threads
    (no default left unresolved), and paths that resolve from any directory."""
    data = config.data if config.data in BUILTIN_DATASETS else str(Path(config.data).resolve())
    weights = str(Path(config.weights).resolve()) if Path(config.weights).is_file() else config.weights
    return replace(
        config,
        img_size=bundle.preprocess.size,
        data=data,
        weights=weights,
        data_root=str(Path(config.data_root).resolve()),
        lr=config.resolved_lr(),
        amp=autocast_dtype(device, config.amp) is not None,
        channels_last=config.channels_last if config.channels_last is not None else device.type == "cuda",
        threads=use_threads(config.threads),
    )


def _build_model(config: TrainConfig, bundle: DataBundle, device: torch.device, *, weights: str) -> nn.Module:
    model = get_model(
        config.model,
        num_classes=len(bundle.classes),
        in_chans=bundle.preprocess.channels,
        weights=weights,
        stem=config.stem,
    ).to(device)
    if config.sync_bn and torch.distributed.is_initialized():
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Two groups: weights with decay, biases and normalization parameters without."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    lr = config.resolved_lr()
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=config.momentum > 0)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


def autocast_dtype(device: torch.device, amp: bool | None) -> torch.dtype | None:
    """The autocast type of `--amp` (None: fp32): on by default on CUDA (bf16, or fp16 where the
    GPU lacks bf16); on a CPU, bf16 only where the CPU computes it natively."""
    if not (amp if amp is not None else device.type == "cuda"):
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if has_bf16():
        return torch.bfloat16
    log.warning("--amp: this CPU has no native bf16 (AVX-512 BF16 or AMX); training in fp32")
    return None


def _new_run_dir(config: TrainConfig) -> Path:
    base = config.name or f"{config.model}-{Path(config.data).name or 'data'}"
    parent = Path(config.out)
    run_dir, n = parent / base, 1
    while run_dir.exists():
        n += 1
        run_dir = parent / f"{base}-{n}"
    run_dir.mkdir(parents=True)
    return run_dir


def _meta(config: TrainConfig, bundle: DataBundle, run_id: str) -> dict:
    """The checkpoint fields besides the weights."""
    return {
        "run_id": run_id,  # the run the checkpoint belongs to: a resume checks it against the folder's best.pt
        "arch": config.model,
        "num_classes": len(bundle.classes),
        "in_chans": bundle.preprocess.channels,
        "stem": config.stem,
        "classes": list(bundle.classes),
        "preprocess": bundle.preprocess.to_dict(),
        "config": asdict(config),
        "edgeft_version": __version__,
        "torch_version": str(torch.__version__),
    }


# --- one epoch ----------------------------------------------------------------------------------


def _enter_phase(run: _Run, epoch: int) -> None:
    """Freeze or unfreeze the backbone; wrap (DDP) and compile again when the trained set changes."""
    model, frozen = run.state.model, epoch < run.config.freeze_epochs
    if frozen != run.frozen:
        freeze_backbone(model, frozen)
        run.net = run.ctx.wrap(model, run.device)  # DDP syncs the parameters that train in this phase
        run.net = torch.compile(run.net) if run.config.compile else run.net
        run.frozen = frozen
    model.train()
    if frozen:
        backbone_bn_eval(model)
        model.get_submodule(head_name(model)).train()


def _one_epoch(run: _Run, epoch: int, bar) -> dict:
    """Train one epoch; loss and accuracy sums over every rank, the rate used, images/s."""
    c, s, device = run.config, run.state, run.device
    task = bar.add_task(
        f"epoch {epoch + 1}/{c.epochs}" + (" (head)" if run.frozen else ""),
        total=run.steps_per_epoch,
        count="",
        metrics="",
    )
    started = time.perf_counter()
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.int64)
    losses, seen, rate = [], 0, s.lr.at(epoch * run.steps_per_epoch)
    batches = iterate_batches(
        run.bundle.train,
        batch_size=run.batch_size,
        preprocess=run.bundle.preprocess,
        device=device,
        shuffle=True,
        augment=c.augment,
        flips=run.bundle.flips,
        seed=c.seed * 100_003 + epoch,
        workers=c.workers,
        rank=run.ctx.rank,
        world=run.ctx.world,
        loaders=run.loaders,
    )
    for step, (x, y) in enumerate(batches):
        rate = s.lr.apply(s.optimizer, epoch * run.steps_per_epoch + step)
        x = x.contiguous(memory_format=torch.channels_last) if run.channels_last else x
        with torch.autocast(device.type, dtype=run.autocast) if run.autocast else nullcontext():
            logits = run.net(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=c.label_smoothing)
        s.optimizer.zero_grad(set_to_none=True)
        s.scaler.scale(loss).backward()
        s.scaler.step(s.optimizer)
        s.scaler.update()
        losses.append(loss.detach())
        loss_sum += losses[-1] * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        if bar.live.is_started and ((step + 1) % 10 == 0 or step + 1 == run.steps_per_epoch):  # a sync every 10 steps
            rate_s = seen / (time.perf_counter() - started)
            metrics = f"loss {loss_sum.item() / seen:.4f}  acc {correct.item() / seen:.2%}  {rate_s:,.0f} img/s"
            bar.update(task, completed=step + 1, count=f"{step + 1}/{run.steps_per_epoch}", metrics=metrics)
    seconds = time.perf_counter() - started
    run.ctx.sync_buffers(s.model)
    loss_sum, correct, seen_all = run.ctx.sum(loss_sum, correct, torch.tensor(float(seen), device=device))
    s.step_losses += torch.stack(losses).tolist() if losses else []
    n = max(1, int(seen_all.item()))
    return {
        "lr": rate,
        "train_loss": loss_sum.item() / n,
        "train_acc": correct.item() / n,
        "started": started,
        "images_per_s": n / seconds,
    }


def evaluate(
    model: nn.Module,
    bundle: DataBundle,
    *,
    device: torch.device,
    batch_size: int = 256,
    autocast_dtype=None,
    channels_last: bool = False,
    dist: Dist = Dist(),
    workers: int = 0,
    loaders: FolderLoaders | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy on the validation split (each rank takes a share;
    folder images are decoded by `workers` processes, those of `loaders` if given; unreadable
    ones are left out and counted)."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = torch.zeros((), device=device)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with torch.inference_mode(), autocast:
        batches = iterate_batches(
            bundle.val,
            batch_size=batch_size,
            preprocess=bundle.preprocess,
            device=device,
            rank=dist.rank,
            world=dist.world,
            pad=False,
            workers=workers,
            loaders=loaders,
        )
        for x, y in batches:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
    loss_sum, correct, seen = dist.sum(loss_sum, correct, seen)
    n = max(1.0, seen.item())
    return loss_sum.item() / n, correct.item() / n


def _end_epoch(run: _Run, epoch: int, metrics: dict, val_loss: float, val_acc: float) -> dict:
    """The history row; best, early-stop and plateau bookkeeping."""
    s, c = run.state, run.config
    row = {
        "epoch": epoch + 1,
        "phase": "head" if run.frozen else "all",
        "lr": metrics["lr"],  # the rate of the epoch's last step
        "train_loss": metrics["train_loss"],
        "train_acc": metrics["train_acc"],
        "val_loss": val_loss,
        "val_acc": val_acc,
        "seconds": time.perf_counter() - metrics["started"],
        "images_per_s": metrics["images_per_s"],
    }
    s.history.append(row)
    s.epoch = epoch + 1
    s.lr.end_epoch(epoch, val_loss)
    if (val_acc, -val_loss) > (s.best["val_acc"], -s.best["val_loss"]):
        s.best = {"val_acc": val_acc, "val_loss": val_loss, "epoch": epoch + 1}
    if val_loss < s.lowest_val_loss:
        s.lowest_val_loss, s.stale_epochs = val_loss, 0
    else:
        s.stale_epochs += 1
    s.stopped_early = bool(c.patience) and s.stale_epochs >= c.patience and epoch + 1 < c.epochs
    if s.stopped_early:
        log.info("early stop: val loss has not improved for %d epochs", s.stale_epochs)
    return row


# --- checkpoint and finish ----------------------------------------------------------------------


def _checkpoint(run: _Run, row: dict, *, improved: bool) -> None:
    """best.pt when the epoch improved, last.pt with the whole TrainState, history and curves
    (rank 0 only): one critical section, so an interrupt leaves all four of the same epoch."""
    if not run.ctx.is_main:
        return
    s, weights = run.state, run.state.model.state_dict()
    with deferred_interrupts():
        if improved:
            save_checkpoint(run.run_dir / "best.pt", {**run.meta, "metrics": s.best, "state_dict": weights})
        save_checkpoint(
            run.run_dir / "last.pt",
            {**run.meta, "metrics": row, "state_dict": weights, "resume": s.state_dict(wall_s=run.elapsed())},
        )
        _write_history(run.run_dir / "history.csv", s.history)
        title = f"{run.config.model} on {run.bundle.name}"
        plot_training_curves(s.history, s.step_losses, run.run_dir / "curves.png", title=title)


def _finish(run: _Run) -> TrainResult:
    """The result; summary.json on rank 0."""
    s, ctx = run.state, run.ctx
    ranks_identical = ctx.identical(s.model)
    ctx.close()
    skipped, examples = run.bundle.skipped()
    result = TrainResult(
        run_dir=str(run.run_dir) if ctx.is_main else "",
        best_checkpoint=str(run.run_dir / "best.pt") if ctx.is_main else "",
        best_val_acc=s.best["val_acc"],
        best_epoch=s.best["epoch"],
        epochs=len(s.history),
        stopped_early=s.stopped_early,
        train_images_per_s=len(s.history) / max(1e-9, sum(1 / r["images_per_s"] for r in s.history)),
        wall_s=run.elapsed(),
        skipped_files=skipped,
        device=str(run.device),
        params=sum(p.numel() for p in s.model.parameters()),
        world_size=ctx.world,
        img_size=run.bundle.preprocess.size,
        img_size_from_data=run.bundle.size_from_data,
        threads=run.config.threads,
        history=s.history,
    )
    if not ctx.is_main:
        return result
    if not ranks_identical:
        log.error("the %d ranks ended with different weights", ctx.world)
    summary: dict[str, Any] = {k: v for k, v in asdict(result).items() if k != "history"}
    summary.update(
        ranks_identical=ranks_identical,
        load_average=run.load_average,
        model=run.config.model,
        data=run.bundle.name,
        classes=list(run.bundle.classes),
        skipped_examples=examples,
    )
    atomic_write_text(run.run_dir / "summary.json", jsonio.dumps(summary, indent=2) + "\n")
    return result


def _write_history(path: Path, history: list[dict]) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, text.getvalue())
