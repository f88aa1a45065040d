"""Typed configs of the stages. Torch-free, so the CLI can build them (and show their defaults
in --help) without importing torch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from edgeft import formats
from edgeft.devices import parse_device
from edgeft.errors import InputError
from edgeft.formats.onnx import DEFAULT_OPSET, OPSETS
from edgeft.formats.onnx_int8 import ACTIVATION_TYPES, CALIBRATION_METHODS, QUANT_FORMATS, WEIGHT_TYPES

__all__ = [
    "AUGMENTATIONS",
    "BUILTIN_DATASETS",
    "DEFAULT_OPSET",
    "FORMATS",
    "MAX_BATCH",
    "MAX_NAME_BYTES",
    "MAX_THREADS",
    "MAX_WORKERS",
    "OPSETS",
    "OPTIMIZERS",
    "PRECISIONS",
    "RUNTIMES",
    "SCHEDULERS",
    "BenchConfig",
    "ExportConfig",
    "TrainConfig",
    "check_max_acc_drop",
    "check_threads",
    "check_range",
]

BUILTIN_DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100")  # names --data accepts besides folders
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("cosine", "plateau", "none")
AUGMENTATIONS = ("none", "light", "standard")
STEMS = ("torchvision", "small")

# Upper bounds of the integer options: far above any real use, low enough that nothing downstream
# overflows (torch and numpy take 64-bit integers) or allocates before the value is refused.
MAX_BATCH = 65_536  # images in one batch
MAX_EPOCHS = 100_000  # also bounds the patience options
MAX_WORKERS = 256  # loader processes or decoder threads
MAX_SEED = 2**32 - 1
MAX_THREADS = 1024  # intra-op threads
MAX_NAME_BYTES = 200  # a run or file name (UTF-8): leaves room below the usual 255-byte limit for
# the suffixes and temporaries made from it (`-int8.onnx`, `.<name>.<pid>.edgeft-tmp.onnx.data`)


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as the run's config.json and inside its checkpoints."""

    model: str = "resnet18"  # a name from `edgeft models`
    data: str = "digits"  # digits | mnist | fashion-mnist | cifar10 | cifar100 | an ImageFolder path
    data_root: str = "data"  # where torchvision datasets live (and are downloaded to)
    weights: str = "none"  # none | imagenet | path to an edgeft checkpoint or a state_dict
    stem: str = "torchvision"  # torchvision | small (3x3 stride-1 conv, no max-pool: images <= 64 px)
    img_size: int | None = None  # None: 32 for built-in data; folders: 224 with ImageNet weights, else from the data
    channels: int | None = None  # None: the data's (folders: 1 when every image is grayscale)
    val_split: float = 0.2  # fraction held out when the data has no validation split
    epochs: int = 10
    batch_size: int = 64  # the global batch: split evenly across torchrun ranks
    optimizer: str = "adamw"  # adamw | adam | sgd
    lr: float | None = None  # None: 3e-3 from scratch, 1e-3 fine-tuning (x10 for sgd)
    weight_decay: float = 0.05  # not applied to biases and normalization layers
    momentum: float = 0.9  # sgd only
    scheduler: str = "cosine"  # cosine | plateau (cut on a flat val loss) | none (constant after warm-up)
    warmup_epochs: float = 1.0  # linear warm-up at the start of each phase (capped at half the phase)
    plateau_patience: int = 2  # plateau: cut the rate after this many epochs without a lower val loss
    plateau_factor: float = 0.2  # plateau: the rate is multiplied by this at each cut
    label_smoothing: float = 0.1
    augment: str = "standard"  # none | light | standard
    freeze_epochs: int = 0  # train only the new head for this many epochs, then everything
    unfreeze_lr_scale: float = 0.1  # learning-rate factor once the backbone is unfrozen
    patience: int = 5  # stop after this many epochs without a lower val loss; 0: never
    amp: bool | None = None  # autocast (bf16, or fp16 with loss scaling; CPUs: bf16 where native); None: on for CUDA
    channels_last: bool | None = None  # None: on for CUDA
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: each rank's cuda:LOCAL_RANK)
    compile: bool = False  # torch.compile the model for training
    sync_bn: bool = False  # SyncBatchNorm across ranks under torchrun (CUDA)
    seed: int = 0
    workers: int = 2  # DataLoader workers for folder datasets
    threads: int | None = None  # torch's intra-op threads; None: torch's default (config.json: the number used)
    max_bad_fraction: float = 0.01  # abort when more of a folder's files are unreadable
    out: str = "runs"  # parent of the run folder
    name: str | None = None  # run folder name; None: <model>-<data>, numbered if it exists

    def __post_init__(self) -> None:
        _check_train_config(self)

    def resolved_lr(self) -> float:
        base = 3e-3 if self.weights == "none" else 1e-3
        return self.lr if self.lr is not None else base * (10 if self.optimizer == "sgd" else 1)


def _check_train_config(c: TrainConfig) -> None:
    """Every value a user can give, checked once where the config is built (before any output)."""
    choices = {"optimizer": OPTIMIZERS, "scheduler": SCHEDULERS, "augment": AUGMENTATIONS, "stem": STEMS}
    for key, allowed in choices.items():
        if getattr(c, key) not in allowed:
            raise InputError(f"--{key} must be one of {', '.join(allowed)}, got {getattr(c, key)!r}")
    for key, value, ok, rule in [
        ("epochs", c.epochs, 1 <= c.epochs <= MAX_EPOCHS, f"between 1 and {MAX_EPOCHS}"),
        ("batch-size", c.batch_size, 1 <= c.batch_size <= MAX_BATCH, f"between 1 and {MAX_BATCH}"),
        ("lr", c.lr, c.lr is None or (math.isfinite(c.lr) and c.lr >= 0), "a number >= 0"),
        ("weight-decay", c.weight_decay, math.isfinite(c.weight_decay) and c.weight_decay >= 0, "a number >= 0"),
        ("momentum", c.momentum, 0 <= c.momentum < 1, "in [0, 1)"),
        ("warmup-epochs", c.warmup_epochs, math.isfinite(c.warmup_epochs) and c.warmup_epochs >= 0, "a number >= 0"),
        ("plateau-patience", c.plateau_patience, 1 <= c.plateau_patience <= MAX_EPOCHS, f"between 1 and {MAX_EPOCHS}"),
        ("plateau-factor", c.plateau_factor, 0 < c.plateau_factor < 1, "in (0, 1)"),
        ("label-smoothing", c.label_smoothing, 0 <= c.label_smoothing < 1, "in [0, 1)"),
        ("unfreeze-lr-scale", c.unfreeze_lr_scale, 0 < c.unfreeze_lr_scale <= 1, "in (0, 1]"),
        ("patience", c.patience, 0 <= c.patience <= MAX_EPOCHS, f"0 (never) to {MAX_EPOCHS}"),
        ("workers", c.workers, 0 <= c.workers <= MAX_WORKERS, f"between 0 and {MAX_WORKERS}"),
        ("seed", c.seed, 0 <= c.seed <= MAX_SEED, f"between 0 and {MAX_SEED}"),
        ("threads", c.threads, c.threads is None or 1 <= c.threads <= MAX_THREADS, f"between 1 and {MAX_THREADS}"),
        ("max-bad-fraction", c.max_bad_fraction, 0 <= c.max_bad_fraction <= 1, "in [0, 1]"),
        ("val-split", c.val_split, 0 < c.val_split < 1, "between 0 and 1 (exclusive)"),
        ("img-size", c.img_size, c.img_size is None or 8 <= c.img_size <= 1024, "between 8 and 1024"),
        ("channels", c.channels, c.channels in (None, 1, 3), "1 or 3"),
    ]:
        if not ok:
            raise InputError(f"--{key} must be {rule}, got {value!r}")
    if not 0 <= c.freeze_epochs < c.epochs:
        raise InputError(f"--freeze-epochs must be between 0 and epochs-1 ({c.epochs - 1}), got {c.freeze_epochs}")
    if c.freeze_epochs and c.weights == "none":
        raise InputError("--freeze-epochs needs pretrained --weights (a random backbone gains nothing from freezing)")
    if not c.data or not c.out:
        raise InputError("--data and --out must not be empty")
    _plain_name(c.name)
    _not_a_file("--out", c.out)
    parse_device(c.device)


def _plain_name(name: str | None) -> None:
    """A file or folder name that stays inside the output folder, short enough for the names
    made from it."""
    if name is None:
        return
    if not name or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        raise InputError(f"--name must be a plain name (no '/', not starting with '.'), got {name!r}")
    size = len(name.encode("utf-8", errors="surrogateescape"))
    if size > MAX_NAME_BYTES:
        raise InputError(f"--name must be at most {MAX_NAME_BYTES} bytes long (UTF-8), got {size}")


def _existing_folder(option: str, path: str) -> None:
    if not Path(path).exists():
        raise InputError(f"{option} {path} does not exist")
    if not Path(path).is_dir():
        raise InputError(f"{option} {path} is not a folder (give a folder of images)")


def _not_a_file(option: str, path: str) -> None:
    if Path(path).exists() and not Path(path).is_dir():
        raise InputError(f"{option} {path} is a file, not a folder")


FORMATS = (*formats.names(), "all", "auto")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


@dataclass
class ExportConfig:
    """What `edgeft export` writes, and how it proves the files before keeping them."""

    checkpoint: str  # an edgeft checkpoint (runs/<name>/best.pt)
    format: str = "onnx"  # a registered format, all (each one), or auto (the fastest file that passes, of any)
    precision: str | None = None  # fp32 | fp16 | bf16 | int8 | auto; None: auto with --format auto, else fp32
    candidate_formats: str | None = None  # --format auto: the formats compared (comma-separated); None: every edge one
    out: str = "exported"  # output folder
    name: str | None = None  # file stem; None: the run folder's name, plus the precision unless fp32
    opset: int | None = None  # ONNX opset; None: DEFAULT_OPSET
    device: str = "cpu"  # where TorchScript is traced (cuda for an fp16 TorchScript)
    validate: bool = True  # compare with the checkpoint on real images; gate the result
    data: str | None = None  # validation data; None: the checkpoint's own validation split
    data_root: str | None = None  # None: the checkpoint's
    calib_data: str | None = None  # int8 calibration images; None: the checkpoint's training data
    calib_size: int = 256  # images used for int8 calibration
    calib_method: str | None = None  # minmax | entropy | percentile; None: edgeft.formats.onnx_int8's (minmax)
    activation_type: str | None = None  # int8 activations: uint8 | int8; None: this CPU's (uint8 on x86)
    weight_type: str | None = None  # int8 weights: int8 | uint8; None: int8
    quant_format: str | None = None  # qdq | qoperator; None: qdq
    reduce_range: bool | None = None  # 7-bit int8 weights; None: on for x86 CPUs without VNNI
    fallback: bool | None = None  # ONNX int8 that fails its gate: try the next settings of the ladder; None: on
    max_acc_drop: float | None = (
        None  # accuracy-drop gate in points; None: the precision's default (< 0 fails every file)
    )
    batch_size: int = 8  # the batch > 1 the export is validated at (besides batch 1)
    force: bool = False  # keep a file that fails its gate (marked failed in its metadata)
    threads: int | None = None  # intra-op threads of torch and of the runtimes; None: their defaults

    def __post_init__(self) -> None:
        _one_of("--format", self.format, FORMATS)
        self.precision = self.precision or ("auto" if self.format == "auto" else "fp32")
        _one_of("--precision", self.precision, (*PRECISIONS, "auto"))
        _check_candidate_formats(self)
        for option, value, choices in (
            ("--calib-method", self.calib_method, CALIBRATION_METHODS),
            ("--activation-type", self.activation_type, ACTIVATION_TYPES),
            ("--weight-type", self.weight_type, WEIGHT_TYPES),
            ("--quant-format", self.quant_format, QUANT_FORMATS),
        ):
            if value is not None:
                _one_of(option, value, choices)
        if self.opset is not None and self.opset not in OPSETS:
            raise InputError(f"--opset must be between {OPSETS[0]} and {OPSETS[-1]}, got {self.opset}")
        _refuse_unread_options(self)
        self.device = parse_device(self.device, allow_auto=False)
        _plain_name(self.name)
        if self.calib_data is not None:
            _existing_folder("--calib-data", self.calib_data)
        check_range("--batch-size", self.batch_size, 1, MAX_BATCH)
        check_range("--calib-size", self.calib_size, 1, _MAX_CALIB)
        check_max_acc_drop(self.max_acc_drop)
        check_threads(self.threads)


def _check_candidate_formats(config: ExportConfig) -> None:
    """`--formats` names registered formats, and is given with `--format auto` only."""
    if config.candidate_formats is None:
        return
    if config.format != "auto":
        raise InputError("--formats chooses the candidates of --format auto; give --format auto")
    names = [n.strip() for n in config.candidate_formats.split(",") if n.strip()]
    if not names:
        raise InputError("--formats: give one or more of " + ", ".join(formats.names()))
    for name in names:
        _one_of("--formats", name, formats.names())
    config.candidate_formats = ",".join(dict.fromkeys(names))


def candidate_formats(config: ExportConfig) -> list[formats.Format]:
    """The formats an export writes (or, with --format auto, compares)."""
    if config.format == "all":
        return list(formats.all_formats())
    if config.format != "auto":
        return [formats.get(config.format)]
    if config.candidate_formats:
        return [formats.get(name) for name in config.candidate_formats.split(",")]
    return [f for f in formats.all_formats() if f.deployable]


def _refuse_unread_options(config: ExportConfig) -> None:
    """An option that only some formats read, given for formats that do not read it, is refused
    (never silently ignored)."""
    chosen = candidate_formats(config)
    for option in sorted(set().union(*(f.options for f in formats.all_formats()))):
        if getattr(config, option) is not None and not any(option in f.options for f in chosen):
            readers = ", ".join(f.name for f in formats.all_formats() if option in f.options)
            raise InputError(
                f"--{option.replace('_', '-')} is read by --format {readers} only, not by --format {config.format}"
            )


def check_threads(threads: int | None) -> None:
    """--threads: None (the defaults) or 1 to MAX_THREADS."""
    if threads is not None:
        check_range("--threads", threads, 1, MAX_THREADS)


def check_max_acc_drop(value: float | None) -> None:
    """The accuracy-drop gate a user may set: a finite number of points in [-100, 100] (None: the default)."""
    if value is not None and not (math.isfinite(value) and -100 <= value <= 100):
        raise InputError(f"--max-acc-drop must be a number of points between -100 and 100, got {value}")


def _one_of(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"{option} must be one of {', '.join(choices)}, got {value!r}")


_MAX_CALIB = 100_000  # int8 calibration images


def check_range(option: str, value: int, smallest: int, largest: int) -> None:
    """Refuse an integer option outside [smallest, largest], naming the option."""
    if value < smallest:
        raise InputError(f"{option} must be at least {smallest}, got {value}")
    if value > largest:
        raise InputError(f"{option} must be at most {largest}, got {value}")


RUNTIMES = ("eager", *(f.runtime for f in formats.all_formats()))


@dataclass
class BenchConfig:
    """What `edgeft bench` measures; every row runs in a fresh process."""

    models: tuple[str, ...] = ("resnet18", "resnext50_32x4d", "densenet121")
    runtimes: tuple[str, ...] = RUNTIMES  # eager | torchscript | onnxruntime | executorch
    precisions: tuple[str, ...] = ()  # empty: fp32, plus int8 (onnxruntime, executorch) on CPU or fp16 on CUDA
    batch_sizes: tuple[int, ...] = (1, 8)
    img_size: int = 224
    device: str = "auto"  # auto | cpu | cuda[:N] (a CUDA device that is not usable here: exit 2)
    threads: int = 0  # intra-op threads of every runtime (and of the peak's products); 0: all cores
    warmup: int = 3  # untimed runs before timing
    iterations: int = 100  # timed runs per row, at most (within budget_s), over all rounds
    budget_s: float = 8.0  # a row stops after this many seconds (with at least 5 runs per round)
    rounds: int = 3  # fresh processes per row, taking turns with the model's other rows; p50: their median
    quick: bool = False  # 1 warm-up, <= 10 runs, 2 s per row, 1 round
    checkpoints: tuple[str, ...] = ()  # edgeft checkpoints: their models, with an accuracy column
    data: str | None = None  # accuracy data for `checkpoints`; None: each one's validation split
    out: str = "reports"  # where bench-<timestamp>.md/.json/.png go
    keep_files: bool = False  # keep the timed files in bench-<timestamp>-files/ beside the report
    cache: bool = True  # reuse files made by an earlier run with the same key (edgeft.filecache)
    cache_dir: str | None = None  # None: edgeft.filecache.default_cache_folder()

    def __post_init__(self) -> None:
        """Every value checked before any work (model names are checked against the registry by
        `run_bench`, which has torchvision at hand)."""
        for option, values, known in (
            ("--runtimes", self.runtimes, RUNTIMES),
            ("--precisions", self.precisions, PRECISIONS),
        ):
            unknown = [v for v in values if v not in known]
            if unknown:
                raise InputError(f"{option}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
        if not self.models and not self.checkpoints:
            raise InputError("--models: give at least one model (or --checkpoints)")
        if not self.runtimes:
            raise InputError("--runtimes: give at least one runtime")
        if not self.batch_sizes or any(not isinstance(b, int) or not 1 <= b <= MAX_BATCH for b in self.batch_sizes):
            given = ",".join(map(str, self.batch_sizes)) or "none"
            raise InputError(f"--batch-sizes must be positive integers up to {MAX_BATCH}, got {given}")
        for option, value, smallest, largest in (
            ("--img-size", self.img_size, 8, 1024),
            ("--threads", self.threads, 0, MAX_THREADS),
            ("--warmup", self.warmup, 0, 10_000),
            ("--iterations", self.iterations, 1, 10**6),
            ("--rounds", self.rounds, 1, 1000),
        ):
            check_range(option, value, smallest, largest)
        if not 0 < self.budget_s <= 86_400:
            raise InputError(f"--budget-s must be positive and at most 86400 (a day), got {self.budget_s}")
        _not_a_file("--out", self.out)
        self.device = parse_device(self.device)
