"""Where and in what precision tensors are computed: the one table of dtype names a recipe, a search config
or a flag may give, and the device check every command runs before any work."""

from __future__ import annotations

import torch

from merge_core.errors import EvomergeError

__all__ = ["DTYPES", "check_device", "check_dtype_name", "progress_bar"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                                  "float64": torch.float64}


def check_dtype_name(value: str, field: str) -> None:
    if value not in DTYPES:
        raise EvomergeError(f"{field}: unknown dtype {value!r} (use one of {', '.join(DTYPES)})")


def check_device(device: str, field: str = "--device") -> None:
    """Refuse a device this machine cannot compute on; the message starts with ``field``: a flag
    (``--device``) or a config key (``device:``)."""
    if not isinstance(device, str) or device.split(":")[0] not in ("cpu", "cuda"):
        raise EvomergeError(f"{field} {device!r}: use cpu or cuda (cuda:N for one GPU)")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise EvomergeError(f"{field} {device!r}: not a device name (use cpu, cuda or cuda:N)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise EvomergeError(f"{field} {device}: CUDA is not available on this machine")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise EvomergeError(f"{field} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def progress_bar(label: str, field: str, *, transient: bool = False):
    """The one progress bar of every long command (a merge's tensors, a search's trials): ``label``, bar,
    done/total, elapsed time, then the task's ``field`` (the tensor being merged, the best so far)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn(f"{{task.fields[{field}]}}"), transient=transient)
