"""Parameter values as mergekit resolves them: filters on tensor names, gradients over layer depth, precedence.

Precedence, highest first: slice source (or ``models[i]``) > output slice > global ``parameters`` > the
method's default. A list of numbers is a gradient, interpolated at the layer's relative position ``t``;
``{filter: substring, value: …}`` applies to tensors whose name contains the substring.
"""

from __future__ import annotations

from typing import Any, Iterable

from merge_core.errors import EvomergeError
from merge_core.methods import REQUIRED

# Strings pydantic's lax mode (hence mergekit) reads as booleans.
_TRUE, _FALSE = ("true", "t", "yes", "y", "on", "1"), ("false", "f", "no", "n", "off", "0")


def _as_bool(value: Any) -> bool | None:
    """``value`` as mergekit reads a boolean parameter (1, 1.0, "yes"… are true), or None if it cannot."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    return None


def coerce(name: str, value: Any, default: Any, *, where: str | None = None) -> Any:
    """Validate one scalar against the kind of the parameter's default (bool, int, float, str), reading
    what mergekit reads: 1.0 or "yes" as true, true as 1 (``lenient_reading`` says when it did)."""
    where = where or name
    if isinstance(default, bool):
        reading = _as_bool(value)
        if reading is None:
            raise EvomergeError(f"{where}: expected true or false, got {value!r}")
        return reading
    if isinstance(default, str):
        return str(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise EvomergeError(f"{where}: expected a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise EvomergeError(f"{where}: expected a finite number, got {value!r}")
    if name == "density" and not 0 < number <= 1:
        raise EvomergeError(f"{where}: density must be in (0, 1], got {value!r}")
    if isinstance(default, int) and not isinstance(default, bool) and default is not REQUIRED:
        return int(number) if number == int(number) else number
    return number


def lenient_reading(value: Any, default: Any) -> Any:
    """What ``coerce`` reads ``value`` as when that is not what it says (``normalize: 1.0`` is true, a
    ``weight: true`` is 1.0), else None: a recipe worth a warning, though mergekit reads it silently."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) or (isinstance(value, str) and value.lower() in ("true", "false")) \
            else _as_bool(value)
    if isinstance(value, bool) and not isinstance(default, str):
        return float(value)
    return None


def evaluate(setting: Any, tensor_name: str, t: float, name: str, default: Any) -> Any:
    """Value of one setting for ``tensor_name`` at relative depth ``t``; None when no filter matches."""
    if isinstance(setting, dict) or hasattr(setting, "filter"):
        setting = [setting]
    if not isinstance(setting, list):
        return coerce(name, setting, default)
    if not setting:
        return None
    if all(not hasattr(s, "filter") for s in setting):
        values = [coerce(name, v, default) for v in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return coerce(name, (1 - frac) * values[i0] + frac * values[i1], default)
    for cond in setting:
        if cond.filter in (None, "*") or (tensor_name and cond.filter in tensor_name):
            return evaluate(cond.value, tensor_name, t, name, default)
    return None


def resolve(name: str, default: Any, scopes: Iterable[dict | None], tensor_name: str, t: float,
            *, model: str | None = None) -> Any:
    """First scope that sets ``name`` (and matches the tensor) wins; else the default."""
    for scope in scopes:
        if scope and name in scope:
            value = evaluate(scope[name], tensor_name, t, name, default)
            if value is not None:
                return value
    if default is REQUIRED:
        owner = f"{model}: " if model else ""
        raise EvomergeError(f"{owner}missing required parameter {name!r} (for tensor {tensor_name})")
    return default
