"""What `edgeft bench`'s `% peak` divides by, and what bounds a row far below it.

A peak per precision: the fastest product that the installed runtimes offer for it on the bench's
device with the bench's threads (n x n x n matrix products: torch's here, each format's runtime's
through `Format.gemms`, with 3x3 convolutions as the backbones' layers where a runtime computes
those faster), best of a few runs after a warm-up, each runtime in its own fresh process (`python
-m edgeft.timing`). int8 products count operations (GOP/s), the others FLOP. The memory bandwidth
(a threaded numpy copy) and the batch sizes' throughputs then say, for a row at batch 1 far below
its peak, whether memory traffic or per-call overhead bounds it. Torch-free but for torch's own
products."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

__all__ = [
    "OVER_PEAK_PCT",
    "bound_lines",
    "gemm_runtimes",
    "measure_gemms",
    "method",
    "memory_bandwidth",
    "over_peak",
    "peak_lines",
    "peaks_per_precision",
    "unit",
    "what_bounds",
]

CUDA_N = 8192  # n of the matrix products on a GPU, large enough for the tensor cores (a CPU: GemmShapes' 2048)
CUDA_CALLS = 10  # products per timed run on a GPU, so one launch's latency does not count
MIN_RUNS, MAX_RUNS, BUDGET_S = 3, 20, 0.1  # timed runs per product: at least 3, more while under 0.1 s
COPY_MB, COPY_RUNS = 256, 3  # the bandwidth copy: far beyond any cache
OVER_PEAK_PCT = 105.0  # a row above this beats every product measured: the product set is incomplete
FAR_BELOW_PCT = 50.0  # a batch-1 row below this gets a sentence on what bounds it
MEMORY_BOUND_SHARE = 0.5  # weights read at this share of the copy bandwidth or more: memory traffic bounds it
OVERHEAD_GAIN = 1.3  # a larger batch this many times the images/s or more: per-call overhead bounds batch 1
BYTES_PER_WEIGHT = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


def unit(precision: str) -> str:
    """GOP/s for integer products, GFLOP/s for floating point."""
    return "GOP/s" if precision == "int8" else "GFLOP/s"


def gemm_runtimes(device: str, precisions: list[str]) -> list[str]:
    """The runtimes whose products are candidates: torch always; on the CPU, each installed
    format's runtime that offers one of `precisions`."""
    from edgeft import formats

    if device.startswith("cuda"):
        return ["torch"]  # onnxruntime's CUDA provider calls the same cuBLAS
    offered = [f for f in formats.all_formats() if set(f.gemm_precisions) & set(precisions) and f.missing() is None]
    return ["torch", *(f.runtime for f in offered)]


def measure_gemms(
    *, runtime: str, precisions: list[str], device: str, threads: int, shapes: dict | None = None
) -> list[dict]:
    """In this process: each product `runtime` offers for `precisions` (at `shapes`, GemmShapes'
    fields; by default the device's), timed; a product that cannot be built or run is an entry
    with its error, not a failure."""
    from edgeft.formats.base import GemmShapes

    sizes = _shapes(device) if shapes is None else GemmShapes(shapes["n"], tuple(map(tuple, shapes["convolutions"])))
    results = []
    for precision in precisions:
        entry = {"runtime": runtime, "precision": precision}
        try:
            for gemm in _gemms(runtime, precision, device, sizes, threads):
                results.append({**entry, "gemm": gemm.label, **_time(gemm.run, gemm.operations)})
        except Exception as exc:  # noqa: BLE001 - any runtime's failure: one candidate less, and why
            results.append({**entry, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"})
    return results


def _shapes(device: str):
    from edgeft.formats.base import GemmShapes

    return GemmShapes(n=CUDA_N) if device.startswith("cuda") else GemmShapes()


def method(device: str, threads: int, runtimes: list[str]) -> str:
    """How the products of `runtimes` are measured on `device`, in words for the report."""
    shapes = _shapes(device)
    products = f"{shapes.n} x {shapes.n} x {shapes.n} matrix products"
    if device == "cpu":
        convolutions = ", ".join(shapes.conv_label(*c) for c in shapes.convolutions)
        products += f" and, where a runtime has them, 3x3 convolutions as the backbones' layers ({convolutions})"
        where = f"{threads} threads"
    else:
        where = f"{device}, {CUDA_CALLS} products per timed run"
    return (
        f"{products} of {', '.join(runtimes)}, {where}, fastest of {MIN_RUNS} or more runs after a warm-up, "
        "each runtime in a fresh process"
    )


def _gemms(runtime: str, precision: str, device: str, shapes, threads: int) -> list:
    from edgeft import formats

    if runtime == "torch":
        return _torch_gemms(precision, device, shapes.n, threads)
    fmt = formats.by_runtime(runtime)
    return fmt.gemms(precision, shapes, threads) if precision in fmt.gemm_precisions else []


def _torch_gemms(precision: str, device: str, size: int, threads: int) -> list:
    """torch.matmul (fp32; on CUDA also with TF32, as cuDNN convolutions run by default; bf16
    where native; fp16 on CUDA) and torch._int_mm for int8."""
    import torch

    from edgeft.cpu import has_bf16
    from edgeft.formats.base import Gemm

    torch.set_num_threads(threads)
    cuda = device.startswith("cuda")
    operations = (CUDA_CALLS if cuda else 1) * 2 * size**3
    if precision == "int8":
        a, b = (torch.randint(-128, 128, (size, size), dtype=torch.int8, device=device) for _ in range(2))
        return [Gemm("_int_mm s8 x s8", _torch_run(lambda: torch._int_mm(a, b), device), operations)]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    native = {"fp32": True, "bf16": cuda or has_bf16(), "fp16": cuda}  # no peak for emulated bf16, CPU fp16
    if not native.get(precision):
        return []
    a, b = (torch.randn(size, size, device=device, dtype=dtypes[precision]) for _ in range(2))

    def matmul(tf32: bool) -> Callable[[], object]:
        def product():
            torch.backends.cuda.matmul.allow_tf32 = tf32
            return torch.matmul(a, b)

        return _torch_run(product, device)

    gemms = [Gemm(f"matmul {precision}", matmul(False), operations)]
    if cuda and precision == "fp32":
        gemms.append(Gemm("matmul fp32 as TF32", matmul(True), operations))
    return gemms


def _torch_run(product: Callable[[], object], device: str) -> Callable[[], object]:
    """One timed run: a product on the CPU; CUDA_CALLS of them on a GPU, then a synchronization."""
    import torch

    if not device.startswith("cuda"):
        return product

    def run() -> None:
        for _ in range(CUDA_CALLS):
            product()
        torch.cuda.synchronize(device)

    return run


def _time(run: Callable[[], object], operations: int) -> dict:
    """G operations per second of `run`'s fastest timed run after a warm-up (packing, first touch)."""
    run()
    best, runs, started = float("inf"), 0, time.perf_counter()
    while runs < MIN_RUNS or (runs < MAX_RUNS and time.perf_counter() - started < BUDGET_S):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
        runs += 1
    return {"g_per_s": operations / best / 1e9, "runs": runs}


def memory_bandwidth(*, threads: int, device: str = "cpu", megabytes: int = COPY_MB) -> dict:
    """GB/s (bytes read + written) of a copy of `megabytes`, fastest of COPY_RUNS after a warm-up:
    on the CPU with numpy split among `threads` threads (numpy copies without the GIL); on a GPU
    on the device, with torch."""
    cuda = device.startswith("cuda")
    copy = _cuda_copy(device, megabytes) if cuda else _threaded_copy(threads, megabytes)
    how = f"torch copy of {megabytes} MB on {device}" if cuda else f"numpy copy of {megabytes} MB in {threads} threads"
    copy()
    best = float("inf")
    for _ in range(COPY_RUNS):
        start = time.perf_counter()
        copy()
        best = min(best, time.perf_counter() - start)
    return {
        "gb_per_s": 2 * megabytes * 2**20 / best / 1e9,
        "method": f"{how}, bytes read + written, best of {COPY_RUNS}",
    }


def _threaded_copy(threads: int, megabytes: int) -> Callable[[], None]:
    source = np.ones(megabytes * 2**20 // 8)
    target = np.zeros_like(source)
    bounds = [(part[0], part[-1] + 1) for part in np.array_split(np.arange(source.size), threads) if part.size]

    def copy() -> None:
        workers = [threading.Thread(target=np.copyto, args=(target[lo:hi], source[lo:hi])) for lo, hi in bounds]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    return copy


def _cuda_copy(device: str, megabytes: int) -> Callable[[], None]:
    import torch

    source = torch.ones(megabytes * 2**20 // 4, device=device)
    target = torch.empty_like(source)

    def copy() -> None:
        target.copy_(source)
        torch.cuda.synchronize(device)

    return copy


def peaks_per_precision(measured: list[dict], precisions: list[str]) -> dict[str, dict]:
    """Per precision, the fastest product measured (with its runtime and what it computed), or why
    there is none."""
    peaks = {}
    for precision in precisions:
        timed = [m for m in measured if m["precision"] == precision and "g_per_s" in m]
        if timed:
            peaks[precision] = {**max(timed, key=lambda m: m["g_per_s"]), "unit": unit(precision)}
        else:
            errors = "; ".join(f"{m['runtime']}: {m['error']}" for m in measured if m.get("precision") == precision)
            peaks[precision] = {"g_per_s": None, "unit": unit(precision), "why": errors or "no runtime here offers one"}
    return peaks


def peak_lines(peak: dict) -> list[str]:
    """The report's lines on the peaks: per precision the peak and every candidate, fastest first."""
    lines = []
    for precision, best in peak["per_precision"].items():
        if best["g_per_s"] is None:
            lines.append(f"{precision}: none measured ({best['why']})")
            continue
        timed = sorted((m for m in peak["gemms"] if m["precision"] == precision and "g_per_s" in m), key=_speed)
        candidates = ", ".join(f"{m['runtime']} {m['gemm']} {m['g_per_s']:.1f}" for m in timed)
        lines.append(f"{precision}: **{best['g_per_s']:.1f} {best['unit']}** ({candidates})")
    return lines


def _speed(measured: dict) -> float:
    return -measured["g_per_s"]


def over_peak(rows) -> list:
    """The rows above OVER_PEAK_PCT of their precision's peak: a kernel of theirs beats every
    product measured."""
    return [r for r in rows if r.pct_of_peak is not None and r.pct_of_peak > OVER_PEAK_PCT]


def what_bounds(row, batched, bandwidth_gb_s: float | None) -> str:
    """Why `row` (batch 1, far below its peak) is slow, from measurements: memory traffic when
    reading its weights once per inference takes MEMORY_BOUND_SHARE of the copy bandwidth or more;
    per-call overhead when `batched` (same model, runtime, precision, a larger batch) runs
    OVERHEAD_GAIN times the images per second or more; else its kernels."""
    weights_gb = row.params_m * 1e6 * BYTES_PER_WEIGHT.get(row.precision, 4) / 1e9
    stream = weights_gb / (row.p50_ms / 1000)
    share = stream / bandwidth_gb_s if bandwidth_gb_s else None
    gain = batched.images_per_s / row.images_per_s if batched else None
    facts = [] if gain is None else [f"batch {batched.batch} runs {gain:.1f}x the img/s"]
    facts.append(f"weights read at {stream:.1f} GB/s" + ("" if share is None else f", {100 * share:.0f} % of the copy"))
    if share is not None and share >= MEMORY_BOUND_SHARE:
        cause = "memory traffic"
    elif gain is not None and gain >= OVERHEAD_GAIN:
        cause = "per-call overhead"
    elif share is not None and gain is not None:
        cause = "its kernels, not memory traffic or per-call overhead"
    else:
        cause = "not told apart (no bandwidth or no larger batch measured)"
    return f"{row.runtime} {row.precision} at {row.pct_of_peak:.0f} % of peak: {cause} ({'; '.join(facts)})"


def bound_lines(rows, bandwidth_gb_s: float | None) -> list[str]:
    """Markdown, per model with a batch-1 row below FAR_BELOW_PCT of its peak: what bounds each
    such row (a nested item), against the largest batch of the same model, runtime and precision."""
    ok = [r for r in rows if r.status == "ok"]
    lines = []
    for model in dict.fromkeys(r.model for r in ok):
        clauses = []
        for row in (r for r in ok if r.model == model and r.batch == 1):
            if row.pct_of_peak is None or row.pct_of_peak >= FAR_BELOW_PCT or row.params_m is None:
                continue
            same = [r for r in ok if (r.model, r.runtime, r.precision) == (model, row.runtime, row.precision)]
            batched = max(same, key=lambda r: r.batch)
            clauses.append(what_bounds(row, batched if batched.batch > 1 else None, bandwidth_gb_s))
        if clauses:
            lines.append(f"{model}:\n" + "".join(f"  - {clause}\n" for clause in clauses))
    return lines
