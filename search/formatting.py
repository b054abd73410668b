"""How many decimals a column of scores needs: enough to tell its rows apart, and every difference shown
with two significant digits, whatever the metric's scale (accuracies near 0.5, 1/perplexities near 0.16)."""

from __future__ import annotations

import math
from collections.abc import Iterable

MIN_DECIMALS = 3
MAX_DECIMALS = 8


def _finite(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def decimals_to_separate(values: Iterable[float], *, minimum: int = MIN_DECIMALS, maximum: int = MAX_DECIMALS) -> int:
    """The fewest decimals (at least ``minimum``) at which values that differ print differently; values
    equal to 12 significant digits (float noise) count as one."""
    distinct = {float(f"{v:.12g}") for v in _finite(values)}
    for decimals in range(minimum, maximum + 1):
        if len({f"{v:.{decimals}f}" for v in distinct}) == len(distinct):
            return decimals
    return maximum


def decimals_for_differences(values: Iterable[float], *, minimum: int = MIN_DECIMALS, maximum: int = MAX_DECIMALS,
                             significant: int = 2) -> int:
    """Decimals that separate the differences and show the smallest nonzero one with ``significant`` digits."""
    values = _finite(values)
    nonzero = [abs(v) for v in values if abs(v) > 1e-12]
    decimals = decimals_to_separate(values, minimum=minimum, maximum=maximum)
    if nonzero:
        # 1e-5 - ε counts as 1e-5
        decimals = max(decimals, significant - 1 - math.floor(math.log10(min(nonzero)) + 1e-9))
    return min(decimals, maximum)
