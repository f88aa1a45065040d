"""`edgeft train`: options in, TrainConfig to the library, a summary out."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeft.config import AUGMENTATIONS, OPTIMIZERS, SCHEDULERS, STEMS
from edgeft.config import TrainConfig as C
from edgeft.errors import InputError

from . import THREADS_HELP, app, load_note
from .helptext import DATA_CHOICES, one_of

_MODEL = "Model"
_DATA = "Data"
_OPT = "Optimization"
_RUN = "Run"


_ModelOption = Annotated[str, typer.Option(help="Backbone, see `edgeft models`.", rich_help_panel=_MODEL)]
_DataOption = Annotated[
    str,
    typer.Option(help=DATA_CHOICES, rich_help_panel=_DATA),
]
_DataRootOption = Annotated[str, typer.Option(help="Folder of the torchvision datasets.", rich_help_panel=_DATA)]
_WeightsOption = Annotated[
    str,
    typer.Option(help="none | imagenet | path of an edgeft checkpoint or state_dict.", rich_help_panel=_MODEL),
]
_StemOption = Annotated[
    str,
    typer.Option(
        help=f"{one_of(STEMS)} (small: 3x3 stride-1 conv, no max-pool, for images <= 64 px).",
        rich_help_panel=_MODEL,
    ),
]
_ImgSizeOption = Annotated[
    Optional[int],
    typer.Option(
        help="Input side in pixels (default: 32 for built-in data; folders: 224 with ImageNet weights, "
        "else from the images).",
        rich_help_panel=_DATA,
    ),
]
_ChannelsOption = Annotated[Optional[int], typer.Option(help="1 or 3 (default: the data's).", rich_help_panel=_DATA)]
_ValSplitOption = Annotated[
    float, typer.Option(help="Held-out fraction when the data has no val split.", rich_help_panel=_DATA)
]
_AugmentOption = Annotated[
    str, typer.Option(help=f"Training augmentation: {one_of(AUGMENTATIONS)}.", rich_help_panel=_DATA)
]
_MaxBadFractionOption = Annotated[
    float, typer.Option(help="Abort when more of a folder's files are unreadable.", rich_help_panel=_DATA)
]
_EpochsOption = Annotated[int, typer.Option(help="Passes over the training data.", rich_help_panel=_OPT)]
_BatchSizeOption = Annotated[
    int, typer.Option(help="Images per step (split across torchrun processes).", rich_help_panel=_OPT)
]
_OptimizerOption = Annotated[str, typer.Option(help=f"{one_of(OPTIMIZERS)}.", rich_help_panel=_OPT)]
_LrOption = Annotated[
    Optional[float],
    typer.Option(
        help="Peak learning rate (default: 3e-3 from scratch, 1e-3 fine-tuning, x10 for sgd).",
        rich_help_panel=_OPT,
    ),
]
_WeightDecayOption = Annotated[
    float, typer.Option(help="Weight decay (not on biases and norm layers).", rich_help_panel=_OPT)
]
_MomentumOption = Annotated[float, typer.Option(help="SGD momentum.", rich_help_panel=_OPT)]
_SchedulerOption = Annotated[
    str, typer.Option(help=f"Learning-rate schedule: {one_of(SCHEDULERS)}.", rich_help_panel=_OPT)
]
_WarmupEpochsOption = Annotated[
    float, typer.Option(help="Linear warm-up at the start of each phase.", rich_help_panel=_OPT)
]
_PlateauPatienceOption = Annotated[
    int,
    typer.Option(help="plateau: cut the LR after this many epochs without lower val loss.", rich_help_panel=_OPT),
]
_PlateauFactorOption = Annotated[float, typer.Option(help="plateau: LR factor of each cut.", rich_help_panel=_OPT)]
_LabelSmoothingOption = Annotated[
    float, typer.Option(help="Label smoothing of the loss, in [0, 1).", rich_help_panel=_OPT)
]
_FreezeEpochsOption = Annotated[
    int,
    typer.Option(help="Epochs training only the new head (backbone and its BatchNorm frozen).", rich_help_panel=_OPT),
]
_UnfreezeLrScaleOption = Annotated[float, typer.Option(help="LR factor after unfreezing.", rich_help_panel=_OPT)]
_PatienceOption = Annotated[
    int,
    typer.Option(help="Early stop after this many epochs without lower val loss; 0 never.", rich_help_panel=_OPT),
]
_AmpOption = Annotated[
    Optional[bool],
    typer.Option(
        "--amp/--no-amp",
        help="Autocast: bf16 (fp16 + loss scaling on GPUs without bf16; CPUs: only with native bf16) "
        "(default: on for CUDA).",
        rich_help_panel=_RUN,
    ),
]
_ChannelsLastOption = Annotated[
    Optional[bool],
    typer.Option(
        "--channels-last/--no-channels-last",
        help="NHWC memory layout (default: on for CUDA).",
        show_default=False,
        rich_help_panel=_RUN,
    ),
]
_DeviceOption = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.", rich_help_panel=_RUN)]
_CompileOption = Annotated[bool, typer.Option("--compile", help="torch.compile the model.", rich_help_panel=_RUN)]
_SyncBnOption = Annotated[
    bool, typer.Option("--sync-bn", help="SyncBatchNorm across torchrun ranks (CUDA).", rich_help_panel=_RUN)
]
_NprocOption = Annotated[
    int,
    typer.Option(help="Processes on this machine: runs itself under torchrun (one per GPU).", rich_help_panel=_RUN),
]
_SeedOption = Annotated[
    int, typer.Option(help="Seed of weights init, shuffling and augmentation.", rich_help_panel=_RUN)
]
_WorkersOption = Annotated[int, typer.Option(help="DataLoader workers (folder data).", rich_help_panel=_RUN)]
_ThreadsOption = Annotated[Optional[int], typer.Option(help=THREADS_HELP, show_default=False, rich_help_panel=_RUN)]
_OutOption = Annotated[str, typer.Option(help="Parent folder of the run folder.", rich_help_panel=_RUN)]
_NameOption = Annotated[
    Optional[str], typer.Option(help="Run folder name (default: <model>-<data>, numbered).", rich_help_panel=_RUN)
]
_ResumeOption = Annotated[
    Optional[Path],
    typer.Option(
        help="Continue a run (its folder or last.pt) with its own config; with --epochs, extend it.",
        rich_help_panel=_RUN,
    ),
]


@app.command("train")
def train_command(
    ctx: typer.Context,
    model: _ModelOption = C.model,
    data: _DataOption = C.data,
    data_root: _DataRootOption = C.data_root,
    weights: _WeightsOption = C.weights,
    stem: _StemOption = C.stem,
    img_size: _ImgSizeOption = C.img_size,
    channels: _ChannelsOption = C.channels,
    val_split: _ValSplitOption = C.val_split,
    augment: _AugmentOption = C.augment,
    max_bad_fraction: _MaxBadFractionOption = C.max_bad_fraction,
    epochs: _EpochsOption = C.epochs,
    batch_size: _BatchSizeOption = C.batch_size,
    optimizer: _OptimizerOption = C.optimizer,
    lr: _LrOption = C.lr,
    weight_decay: _WeightDecayOption = C.weight_decay,
    momentum: _MomentumOption = C.momentum,
    scheduler: _SchedulerOption = C.scheduler,
    warmup_epochs: _WarmupEpochsOption = C.warmup_epochs,
    plateau_patience: _PlateauPatienceOption = C.plateau_patience,
    plateau_factor: _PlateauFactorOption = C.plateau_factor,
    label_smoothing: _LabelSmoothingOption = C.label_smoothing,
    freeze_epochs: _FreezeEpochsOption = C.freeze_epochs,
    unfreeze_lr_scale: _UnfreezeLrScaleOption = C.unfreeze_lr_scale,
    patience: _PatienceOption = C.patience,
    amp: _AmpOption = C.amp,
    channels_last: _ChannelsLastOption = C.channels_last,
    device: _DeviceOption = C.device,
    compile: _CompileOption = C.compile,
    sync_bn: _SyncBnOption = C.sync_bn,
    nproc: _NprocOption = 1,
    seed: _SeedOption = C.seed,
    workers: _WorkersOption = C.workers,
    threads: _ThreadsOption = C.threads,
    out: _OutOption = C.out,
    name: _NameOption = C.name,
    resume: _ResumeOption = None,
) -> None:
    """Fine-tune (--weights imagenet|PATH) or train from scratch; writes runs/<name>/."""
    options = dict(locals())
    options.pop("ctx")
    if options.pop("nproc") > 1 and "WORLD_SIZE" not in os.environ:
        _exec_torchrun(nproc, device)
    resume = options.pop("resume")
    if resume is None:
        config = C(**options)  # every value checked here, before anything is written
    from edgeft import train as training

    load_note()
    if resume is None:
        result = training.train(config, progress=True)
    else:
        epochs = _epochs_with_resume(ctx)
        training.check_unfinished(resume, epochs=epochs)
        result = training.resume(resume, epochs=epochs, progress=True)
    if result.run_dir:  # empty on a torchrun rank other than 0: rank 0 reports
        _print_result(result)


def _print_result(result) -> None:
    """The run's summary and the next command."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(show_header=False, box=None)
    table.add_row("best val accuracy", f"{result.best_val_acc:.2%} (epoch {result.best_epoch})")
    table.add_row("epochs", f"{result.epochs}" + (" (early stop)" if result.stopped_early else ""))
    table.add_row("train images/s", f"{result.train_images_per_s:,.0f} on {result.device}, {result.threads} threads")
    table.add_row("wall time", f"{result.wall_s:.1f} s")
    if result.img_size_from_data:
        table.add_row(
            "image size", f"{result.img_size} px (from the images' median shorter side; --img-size to choose)"
        )
    if result.skipped_files:
        table.add_row("skipped files", f"[yellow]{result.skipped_files}[/] (unreadable; listed in summary.json)")
    table.add_row("run folder", escape(result.run_dir))
    console = Console()
    console.print(table)
    console.print(f"next: edgeft export {escape(result.best_checkpoint)}")


def _epochs_with_resume(context: typer.Context) -> int | None:
    """--epochs when given with --resume (it extends the run); any other option is refused,
    since a resumed run keeps its own config."""
    given = [
        name for name in context.params if getattr(context.get_parameter_source(name), "name", "") == "COMMANDLINE"
    ]
    others = sorted(set(given) - {"resume", "epochs", "nproc"})
    if others:
        flags = ", ".join("--" + name.replace("_", "-") for name in others)
        raise InputError(
            f"--resume continues a run with its own config; {flags} cannot change (only --epochs, to extend it)"
        )
    return context.params["epochs"] if "epochs" in given else None


def _exec_torchrun(nproc: int, device: str) -> None:
    """Replace this process with `torchrun --standalone --nproc_per_node N -m edgeft <same args>`,
    once `nproc` is checked against `device`."""
    from edgeft.distributed import check_nproc

    check_nproc(nproc, device)
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "edgeft",
        *args,
    ]
    print("edgeft: " + " ".join(command[1:]), file=sys.stderr)
    os.execv(sys.executable, command)
