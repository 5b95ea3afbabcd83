"""Inference precision: which number format an :class:`~vlsearch.models.factory.Encoder` computes in.

``resolve_precision(requested, device, model)`` turns ``auto | fp32 | bf16 | fp16 | int8`` into a
:class:`PrecisionChoice` (the format, how it is applied, and why), and :func:`apply_precision`
applies it to a model. Embeddings leave the encoder as float32, unit norm, whatever the choice.

* **CUDA**: ``auto`` is bf16 autocast (fp16 where the GPU lacks bf16), as before.
* **CPU**: ``bf16`` casts weights *and* inputs to bfloat16 (CPU autocast is slower than fp32:
  it re-casts weights on every call). ``auto`` picks bf16 only where the CPU runs it fast: it
  needs bf16 instructions (x86 ``avx512_bf16``/``amx_bf16``, Arm ``bf16``; without them bf16 is
  emulated, ~20x slower than fp32 on an AVX2 CPU) **and** a short micro-benchmark of the op kinds
  the model uses (matmul, and spatial convolution for convolutional towers) must show a speed-up
  of at least :data:`MIN_SPEEDUP`. The benchmark runs once per CPU / torch version / thread
  count and is cached in ``~/.cache/vlsearch/precision.json`` (``$VLSEARCH_CACHE_DIR`` moves it).
* ``int8``: dynamic quantisation of ``nn.Linear`` layers (``torch.ao``), CPU only; explicit only.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from vlsearch.core.errors import PrecisionError
from vlsearch.core.fsutil import write_json

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
#: bf16 must run at least this much faster than fp32 on every op kind a model uses for ``auto``.
MIN_SPEEDUP = 1.25
#: /proc/cpuinfo flags that mean native bf16 arithmetic (x86: AVX-512 BF16, AMX; Arm: FEAT_BF16).
BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
CACHE_FILE = "precision.json"
#: Part of the cache key: version 1 timed all fp32 calls, then all bf16 ones, and one burst of other
#: load during the bf16 calls could cache "bf16 is no faster" for good (seen: 0.998x on a CPU where
#: it is 2.4x); version 2 interleaves them (:func:`_best_seconds`), and its entries replace version 1's.
PROBE_VERSION = 2
#: Interleaved fp32 / bf16 rounds per op kind (within the time budget).
PROBE_ROUNDS = 5
OP_KINDS = ("matmul", "conv")


@dataclass(frozen=True)
class PrecisionChoice:
    """The resolved precision: ``name`` (fp32/bf16/fp16/int8), ``mode`` (``none``, ``autocast``,
    ``weights`` = bf16 weights and inputs, ``quantized`` = int8 Linear layers), and why."""

    name: str
    mode: str
    reason: str


@dataclass(frozen=True)
class CpuCapability:
    """What the CPU offers for reduced precision; ``native_bf16`` is None when it cannot be told."""

    arch: str
    torch_capability: str
    bf16_flags: tuple[str, ...]
    native_bf16: bool | None

    @property
    def key(self) -> str:
        """Cache key: the benchmark is valid for this CPU, torch build and thread count."""
        return (f"{self.arch}|{self.torch_capability}|{','.join(self.bf16_flags) or '-'}|"
                f"torch {torch.__version__}|threads {torch.get_num_threads()}|probe {PROBE_VERSION}")

    def describe(self) -> str:
        flags = ", ".join(self.bf16_flags) or "no bf16 instructions"
        return f"{self.torch_capability} ({flags})"


def describe_machine() -> str:
    """One line describing this machine for provenance and benchmark reports: CPU model and bf16
    support, cores, GPU, torch and its threads, Python."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu} ({cpu_capability().describe()}), {os.cpu_count()} cores, {gpu}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def cpu_capability(cpuinfo: str | None = None) -> CpuCapability:
    """Read the CPU's bf16 support from ``/proc/cpuinfo`` (or the given text) and torch."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    words: set[str] = set()
    for line in cpuinfo.splitlines():
        label, _, value = line.partition(":")
        if label.strip().lower() in ("flags", "features"):
            words.update(value.split())
    flags = tuple(f for f in BF16_FLAGS if f in words)
    native = bool(flags) if words else None  # no flag list (macOS, Windows): let the benchmark decide
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    return CpuCapability(platform.machine(), str(capability), flags, native)


@dataclass(frozen=True)
class Bf16Benchmark:
    """Measured bf16-over-fp32 speed-up per op kind (>1: bf16 faster) and what it cost."""

    speedup: dict[str, float]
    seconds: float
    key: str


def _best_seconds(fns: tuple[Callable[[], object], ...], rounds: int, budget_s: float) -> list[float]:
    """Each function's best time over up to ``rounds`` interleaved calls (A, B, A, B, ...), after
    one warm-up call each, stopping early once ``budget_s`` is spent. Interleaved, a burst of other
    load slows both sides of one round, not one side of the whole measurement."""
    start = time.perf_counter()
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
        if time.perf_counter() - start > budget_s:
            break
    return best


def _ops() -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """Representative work per op kind: a transformer MLP block, a conv-BN-activation block."""
    torch.manual_seed(0)
    matmul = torch.nn.Sequential(torch.nn.Linear(384, 1536), torch.nn.GELU(), torch.nn.Linear(1536, 384))
    conv = torch.nn.Sequential(torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.Hardswish())
    return {"matmul": (matmul.eval(), torch.randn(128, 384)), "conv": (conv.eval(), torch.randn(4, 32, 32, 32))}


def benchmark_bf16(budget_s: float = 0.5) -> Bf16Benchmark:
    """Time fp32 against bf16 (weights and inputs) on each op kind; a few hundred ms in all."""
    start = time.perf_counter()
    speedup = {}
    with torch.random.fork_rng(devices=[]):  # seeding the ops must not touch the caller's RNG
        ops = _ops()
    with torch.inference_mode():
        for kind, (module, x) in ops.items():
            half, xb = copy.deepcopy(module).to(torch.bfloat16), x.to(torch.bfloat16)
            fp32, bf16 = _best_seconds((lambda: module(x), lambda: half(xb)), PROBE_ROUNDS, budget_s / 2)
            speedup[kind] = round(fp32 / bf16, 3)
    return Bf16Benchmark(speedup, round(time.perf_counter() - start, 3), cpu_capability().key)


def cache_path() -> Path:
    root = os.environ.get("VLSEARCH_CACHE_DIR")
    if root:
        return Path(root) / CACHE_FILE
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "vlsearch" / CACHE_FILE


def cached_benchmark(capability: CpuCapability, path: Path | None = None) -> Bf16Benchmark:
    """The bf16 benchmark for this CPU / torch / threads from the cache, run (and stored) if absent."""
    path = path or cache_path()
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        entries = {}
    entries = entries if isinstance(entries, dict) else {}
    entry = entries.get(capability.key)
    try:
        if entry is not None:
            return Bf16Benchmark({k: float(v) for k, v in entry["speedup"].items()}, float(entry["seconds"]),
                                 capability.key)
    except (KeyError, TypeError, ValueError, AttributeError):
        log.warning("ignoring a malformed precision cache entry in %s", path)
    result = benchmark_bf16()
    log.info("bf16 micro-benchmark (%.2f s): speed-up over fp32 %s", result.seconds, result.speedup)
    entries[capability.key] = {"speedup": result.speedup, "seconds": result.seconds,
                               "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        write_json(path, entries)
    except OSError as exc:  # a read-only home must not stop encoding
        log.warning("cannot cache the precision benchmark in %s: %s", path, exc)
    return result


def op_kinds(model: torch.nn.Module | None) -> tuple[str, ...]:
    """The op kinds that dominate ``model``'s compute: ``matmul`` (Linear, attention, patch
    embeddings whose kernel equals their stride) and ``conv`` (spatial/depthwise convolutions)."""
    if model is None:
        return OP_KINDS
    kinds = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            kinds.add("matmul")
        elif isinstance(module, torch.nn.modules.conv._ConvNd):
            patchify = tuple(module.kernel_size) == tuple(module.stride)
            kinds.add("matmul" if patchify and module.groups == 1 else "conv")
    return tuple(k for k in OP_KINDS if k in kinds) or ("matmul",)


def check_precision(requested: str) -> str:
    """``requested`` normalised (``'BF16'`` -> ``'bf16'``); :class:`PrecisionError` if unknown."""
    value = str(requested).strip().lower()
    if value not in PRECISIONS:
        raise PrecisionError(f"precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    return value


def resolve_precision(requested: str, device: torch.device | str, model: torch.nn.Module | None = None,
                      *, capability: CpuCapability | None = None) -> PrecisionChoice:
    """Resolve ``requested`` for inference on ``device``; ``model`` lets ``auto`` judge its op kinds.

    Raises :class:`PrecisionError` for an unknown value or an impossible combination (int8 on CUDA).
    """
    value, device = check_precision(requested), torch.device(device)
    if device.type == "cuda":
        if value == "int8":
            raise PrecisionError("precision int8 (dynamic quantisation) runs on CPU only; use bf16 or fp16 on CUDA")
        if value == "auto":
            value = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            return PrecisionChoice(value, "autocast", f"CUDA: {value} autocast")
        return PrecisionChoice(value, "none" if value == "fp32" else "autocast", f"requested {value} (CUDA autocast)")
    if value != "auto":
        mode = {"fp32": "none", "bf16": "weights", "fp16": "autocast", "int8": "quantized"}[value]
        return PrecisionChoice(value, mode, f"requested {value}")
    return _auto_cpu(model, capability or cpu_capability())


def _auto_cpu(model: torch.nn.Module | None, capability: CpuCapability) -> PrecisionChoice:
    if capability.native_bf16 is False:
        return PrecisionChoice("fp32", "none", f"CPU {capability.describe()}: bf16 would be emulated, "
                               "far slower than fp32")
    bench = cached_benchmark(capability)
    kinds = op_kinds(model)
    measured = ", ".join(f"{k} {bench.speedup.get(k, 0.0):.2f}x" for k in kinds)
    if all(bench.speedup.get(k, 0.0) >= MIN_SPEEDUP for k in kinds):
        return PrecisionChoice("bf16", "weights", f"CPU {capability.describe()}: bf16 speed-up {measured} "
                               f"(>= {MIN_SPEEDUP}x) in the cached micro-benchmark")
    return PrecisionChoice("fp32", "none", f"CPU {capability.describe()}: bf16 speed-up only {measured} "
                           f"(< {MIN_SPEEDUP}x) in the cached micro-benchmark")


def apply_precision(model: torch.nn.Module, choice: PrecisionChoice) -> torch.nn.Module:
    """Return ``model`` ready to run at ``choice``: cast to bf16, int8-quantised, or unchanged."""
    if choice.mode == "weights":
        return model.to(torch.bfloat16)
    if choice.mode == "quantized":
        import warnings

        with warnings.catch_warnings():  # torch.ao's deprecation notice: still the supported eager API here
            warnings.simplefilter("ignore")
            quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        for module in quantized.modules():  # open_clip reads its compute dtype off a Linear's weight
            for getter in ("get_cast_dtype", "get_weight_dtype"):
                if hasattr(module, getter):
                    setattr(module, getter, lambda: torch.float32)
        return quantized
    return model


def describe_auto(device: torch.device | str = "cpu") -> dict[str, object]:
    """What ``auto`` picks on ``device`` for a generic model, and why (for ``vlsearch info``)."""
    choice = resolve_precision("auto", device)
    info: dict[str, object] = {"precision_auto": choice.name, "precision_reason": choice.reason}
    if torch.device(device).type == "cpu":
        info["cpu_bf16"] = cpu_capability().describe()
    return info
