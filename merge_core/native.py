"""The hot loop of task arithmetic (ties, dare_*, breadcrumbs, task_arithmetic) compiled: one pass over
memory per chunk instead of a dozen torch ops, each a pass (figures: benchmarks/README.md); the
magnitude histogram TIES's threshold search starts from; and the float32 weighted sums of linear and slerp.

``native.c`` is built on first use with the system's C compiler for this CPU and cached
(``$XDG_CACHE_HOME/evomerge``). It rounds where the torch code in ``merge_core/methods/`` rounds
(``task_arithmetic.py``, ``interpolation.py``) and draws DARE's masks from the same SFC64 stream
(``sparsify.py``), so both give the same bytes; the torch code runs when no compiler is found, on GPUs, for
float16 and for the rarer variants, or with ``EVOMERGE_NATIVE=0``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ["-O3", "-ffp-contract=off", "-fPIC", "-shared"]
CPU_FLAGS = (["-march=native"], [])  # this CPU's vector instructions, unless the compiler cannot target it
MAX_ROWS = 64
KERNELS = {torch.bfloat16: "task_arithmetic_bf16", torch.float32: "task_arithmetic_f32"}
SUM_KERNELS = {torch.bfloat16: "weighted_sum_bf16", torch.float32: "weighted_sum_f32"}
HISTOGRAM_KERNELS = {torch.bfloat16: "magnitude_histogram_bf16", torch.float32: "magnitude_histogram_f32"}


def _cpu_signature() -> bytes:
    """What ``-march=native`` compiled for: a cache shared by machines with other CPUs must not mix them."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return f"{platform.machine()} {flags}".encode()


def _cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "evomerge"


def _build(command: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([*command, "-o", str(built), str(SOURCE)], check=True, capture_output=True, timeout=120)
        os.replace(built, target)  # atomic: processes building at once each install a whole library


def _load(command: list[str], failures: list[str]) -> ctypes.CDLL | None:
    """The library built by ``command``, from the cache (else a per-user temporary one) or built now; why
    not goes to ``failures``."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(command).encode() + _cpu_signature())
    name = f"native-{key.hexdigest()[:16]}.so"
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / f"evomerge-{os.getuid()}"):
        try:
            if not (directory / name).exists():
                _build(command, directory / name)
            return ctypes.CDLL(str(directory / name))  # a foreign call releases the GIL: chunks use all threads
        except subprocess.CalledProcessError as exc:
            failures.append((exc.stderr or b"").decode(errors="replace").strip().split("\n")[0] or str(exc))
        except (OSError, subprocess.SubprocessError) as exc:
            failures.append(str(exc))
    return None


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (then callers use torch). A compiler that fails is worth a warning:
    merges still work, several times slower."""
    if os.environ.get("EVOMERGE_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    failures: list[str] = []
    lib = next(filter(None, (_load([compiler, *FLAGS, *cpu], failures) for cpu in CPU_FLAGS)), None)
    if lib is None:
        warnings.warn(f"evomerge could not build its merge kernels with {compiler} ({failures[-1]}); merging with "
                      "the slower torch code (EVOMERGE_NATIVE=0 turns the kernels off)", RuntimeWarning, stacklevel=2)
        return None
    pointer, flag = ctypes.c_void_p, ctypes.c_int
    for name in KERNELS.values():
        getattr(lib, name).argtypes = [ctypes.c_int64, ctypes.c_int64, pointer, pointer, flag, pointer, pointer,
                                       pointer, pointer, pointer, pointer, pointer, pointer, pointer, pointer, flag,
                                       flag, flag, ctypes.c_float, ctypes.c_float, flag, pointer]
        getattr(lib, name).restype = ctypes.c_int
    for name in SUM_KERNELS.values():
        getattr(lib, name).argtypes = [ctypes.c_int64, ctypes.c_int64, pointer, pointer, flag, flag, ctypes.c_float,
                                       pointer]
        getattr(lib, name).restype = ctypes.c_int
    for name in HISTOGRAM_KERNELS.values():
        getattr(lib, name).argtypes = [ctypes.c_int64, pointer, pointer, pointer]
        getattr(lib, name).restype = None
    return lib


def supports(dtype: torch.dtype, device: torch.device, rows: int) -> bool:
    return device.type == "cpu" and dtype in KERNELS and 1 <= rows <= MAX_ROWS and library() is not None


def sfc64_state(seed: int) -> list[int]:
    """numpy's SFC64 state for ``seed`` (its SeedSequence seeding), continued by the kernel."""
    return [int(v) for v in np.random.SFC64(seed).state["state"]["state"]]


def _array(ctype, values):
    return (ctype * len(values))(*values)


def task_arithmetic(dtype: torch.dtype, *, scales: list[float | None], factors: list[float], weights: list[float],
                    elect: bool, normalize: bool, clamp_tiny: bool, divisor: float, lam: float):
    """The chunk kernel for one tensor's merge, its per-model arguments converted once:
    ``run(base, inputs, inputs_are_deltas, masks, thresholds, draws, out)`` computes
    ``out = base + λ·combine(rows)`` for one chunk. Row i is ``inputs[i]`` (a delta, or a model from which
    ``base`` is subtracted), ``&`` its bit mask, or kept where its magnitude key is above the threshold
    ``(key, ties_end)`` (or equal to it before index ties_end), or where its random draw ``(seed, cut)``
    falls below cut; times ``scales[i]`` if given, times ``factors[i]``. ``elect``: TIES sign election;
    ``normalize`` divides by the kept weights (elect) or by ``divisor``. All flat, contiguous, CPU."""
    rows = len(factors)
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"native task arithmetic: {rows} rows (1 to {MAX_ROWS})")
    fixed = (_array(ctypes.c_float, [1.0 if s is None else s for s in scales]),
             _array(ctypes.c_int32, [s is not None for s in scales]), _array(ctypes.c_float, factors),
             _array(ctypes.c_float, weights), int(elect), int(normalize), int(clamp_tiny), divisor, lam, int(lam != 1))
    kernel = getattr(library(), KERNELS[dtype])

    def run(base: Tensor, inputs: list[Tensor], inputs_are_deltas: bool, masks: list[Tensor | None],
            thresholds: list[tuple[int, int] | None], draws: list[tuple[int, int] | None], out: Tensor) -> None:
        states = [v for draw in draws for v in (sfc64_state(draw[0]) if draw else (0, 0, 0, 0))]
        kernel(rows, base.numel(), base.data_ptr(), _array(ctypes.c_void_p, [t.data_ptr() for t in inputs]),
               int(inputs_are_deltas), _array(ctypes.c_void_p, [None if m is None else m.data_ptr() for m in masks]),
               _array(ctypes.c_int64, [-1 if t is None else t[0] for t in thresholds]),
               _array(ctypes.c_int64, [0 if t is None else t[1] for t in thresholds]),
               _array(ctypes.c_uint64, states), _array(ctypes.c_int32, [draw is not None for draw in draws]),
               _array(ctypes.c_int64, [draw[1] if draw else 0 for draw in draws]), *fixed, out.data_ptr())

    return run


def weighted_sum(inputs: list[Tensor], weights: list[float], out: Tensor, *, fused: bool,
                 divisor: float | None = None) -> None:
    """``out = Σ inputs[i]·weights[i]`` (``/ divisor``) computed in float32, rounded once: ``fused`` as
    ``addcmul_`` into zeros (linear), else each product rounded and added in order (slerp). Flat,
    contiguous, CPU."""
    status = getattr(library(), SUM_KERNELS[out.dtype])(
        len(inputs), out.numel(), _array(ctypes.c_void_p, [t.data_ptr() for t in inputs]),
        _array(ctypes.c_float, weights), int(fused), int(divisor is not None),
        1.0 if divisor is None else divisor, out.data_ptr())
    if status:
        raise ValueError("native weighted sum: no inputs")


def magnitude_histogram(base: Tensor | None, values: Tensor) -> Tensor:
    """How many of the deltas ``values - base`` (or ``values``) have each top-16-bit magnitude digit (2^15
    counts, int64): TIES's threshold search, one pass instead of a subtraction, a mask and a bincount."""
    counts = torch.zeros(1 << 15, dtype=torch.int64)
    getattr(library(), HISTOGRAM_KERNELS[values.dtype])(values.numel(), None if base is None else base.data_ptr(),
                                                        values.data_ptr(), counts.data_ptr())
    return counts
