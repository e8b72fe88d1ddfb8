"""The A/B test: two-proportion z-test with Yates' continuity correction.

The correction makes the test slightly conservative, so its false-positive rate
stays at or under the nominal level, and the sample size it reports uses the
matching correction (Fleiss), so the power it promises is the power it has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

LEVEL = 0.95
TEST_NAME = "two-proportion z-test (continuity-corrected)"
DETECTABLE_LIFT = 0.05  # relative
POWER = 0.8
# Sample sizes are planned for a little more power than promised: the normal
# approximation behind the formula is off by about a point either way.
POWER_MARGIN = 0.02
_NORMAL = NormalDist()


@dataclass(frozen=True)
class Variant:
    version: str
    exposures: int
    conversions: int

    @property
    def rate(self) -> float:
        return self.conversions / self.exposures if self.exposures else 0.0


@dataclass(frozen=True)
class Comparison:
    p_value: float
    verdict: str
    winner: str
    intervals: tuple[tuple[float, float], tuple[float, float]]
    required_exposures: int


def wilson_interval(conversions: int, exposures: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval: stays inside [0, 1] and behaves at small counts."""
    if exposures == 0:
        return 0.0, 1.0
    z = _NORMAL.inv_cdf(0.5 + level / 2)
    p = conversions / exposures
    centre = (p + z * z / (2 * exposures)) / (1 + z * z / exposures)
    half = (z / (1 + z * z / exposures)) * math.sqrt(
        p * (1 - p) / exposures + z * z / (4 * exposures * exposures)
    )
    return max(0.0, centre - half), min(1.0, centre + half)


def p_values(c1: np.ndarray, n1: np.ndarray, c2: np.ndarray, n2: np.ndarray) -> np.ndarray:
    """Two-sided p-values, vectorised so simulations run thousands at once."""
    c1, n1, c2, n2 = (np.asarray(x, dtype=np.float64) for x in (c1, n1, c2, n2))
    with np.errstate(divide="ignore", invalid="ignore"):
        p1, p2 = c1 / n1, c2 / n2
        pooled = (c1 + c2) / (n1 + n2)
        se = np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
        correction = 0.5 * (1 / n1 + 1 / n2)
        z = np.maximum(np.abs(p2 - p1) - correction, 0.0) / se
    erfc = np.vectorize(math.erfc)
    result = erfc(z / math.sqrt(2))
    return np.where((se > 0) & np.isfinite(z), result, 1.0)


def required_exposures(
    base_rate: float, lift: float = DETECTABLE_LIFT, power: float = POWER, level: float = LEVEL
) -> int:
    """Exposures per variant to detect a relative `lift` on `base_rate` (Fleiss, corrected)."""
    if not 0.0 < base_rate < 1.0:
        return 0
    p1 = base_rate
    p2 = min(base_rate * (1 + lift), 0.999999)
    delta = p2 - p1
    z_a = _NORMAL.inv_cdf(0.5 + level / 2)
    z_b = _NORMAL.inv_cdf(min(power + POWER_MARGIN, 0.999))
    mean = (p1 + p2) / 2
    n = (
        z_a * math.sqrt(2 * mean * (1 - mean)) + z_b * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
    ) ** 2 / delta**2
    corrected = n / 4 * (1 + math.sqrt(1 + 4 / (n * delta))) ** 2
    # Rounded up to two significant digits: a plan, not a point estimate, and the
    # margin keeps the promised power from sitting exactly on 0.8.
    step = 10 ** max(int(math.log10(corrected)) - 1, 0)
    return int(math.ceil(corrected / step) * step)


def compare(control: Variant, treatment: Variant, level: float = LEVEL) -> Comparison:
    p = float(
        p_values(
            np.array([control.conversions]),
            np.array([control.exposures]),
            np.array([treatment.conversions]),
            np.array([treatment.exposures]),
        )[0]
    )
    winner = ""
    if p < 1 - level:
        winner = treatment.version if treatment.rate > control.rate else control.version
    verdict = f"{winner} better" if winner else "not significant yet"
    base = control.rate if control.exposures and 0 < control.rate < 1 else 0.0
    return Comparison(
        p_value=p,
        verdict=verdict,
        winner=winner,
        intervals=(
            wilson_interval(control.conversions, control.exposures, level),
            wilson_interval(treatment.conversions, treatment.exposures, level),
        ),
        required_exposures=required_exposures(base, level=level),
    )


def simulate(
    base_rate: float, lift: float, exposures: int, runs: int, seed: int = 0, level: float = LEVEL
) -> float:
    """Share of simulated experiments the test calls significant: the false-positive
    rate when lift is 0 (A/A), the power otherwise."""
    rng = np.random.default_rng(seed)
    control = rng.binomial(exposures, base_rate, runs)
    treatment = rng.binomial(exposures, base_rate * (1 + lift), runs)
    n = np.full(runs, exposures)
    return float(np.mean(p_values(control, n, treatment, n) < 1 - level))
