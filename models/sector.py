"""Probability that n uniform points in a disk lie in one sector (apex at the centre) of angle θ.

ALGORITHMS.md §5 (kexue.fm/archives/9324). Only the angles matter. With x = 1 − θ/(2π):

    P_n(θ) = Σ_{k=1}^{n} (−1)^{k−1} C(n,k) (1 − kx)_+^{n−1}

which is n(θ/2π)^{n−1} for θ ≤ π and 1 for θ ≥ 2π(n−1)/n (pigeonhole). Pure numpy/fractions:
this module imports neither prefect nor ray.
"""
from __future__ import annotations

import math
import numbers
import operator
from fractions import Fraction
from functools import lru_cache

import numpy as np

TAU = 2.0 * math.pi
MC_BATCH = 1 << 15  # point-sets per kernel batch: (n−1, MC_BATCH) uint32 = 128 KiB per row
NETWORK_MAX_ROWS = 64  # above this many angles per set, np.sort beats the sorting network


def _check_n(n: int) -> int:
    """Return n as an int ≥ 1 or raise."""
    if isinstance(n, bool):
        raise TypeError(f"n must be an integer ≥ 1, got {n!r}")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n must be an integer ≥ 1, got {n!r} ({type(n).__name__})") from None
    if n < 1:
        raise ValueError(f"n must be ≥ 1 (number of points), got {n}")
    return n


def _check_theta(theta: float) -> float:
    """Return θ (radians) as a float in (0, 2π] or raise."""
    theta = float(theta)
    if not math.isfinite(theta):
        raise ValueError(f"theta must be finite (radians), got {theta!r}")
    if theta <= 0.0 or theta > TAU:
        raise ValueError(f"theta must be in (0, 2π] radians = (0, {TAU!r}], got {theta!r}; "
                         f"convert degrees with math.radians")
    return theta


def _check_frac(frac: Fraction) -> Fraction:
    """Return θ/2π as a Fraction in (0, 1] or raise."""
    if not isinstance(frac, numbers.Rational):
        raise TypeError(f"frac = θ/2π must be a fractions.Fraction (or int), got "
                        f"{type(frac).__name__} {frac!r}; use sector_prob for floats")
    frac = Fraction(frac)
    if frac <= 0 or frac > 1:
        raise ValueError(f"frac = θ/2π must be in (0, 1], got {frac}")
    return frac


def inclusion_exclusion(n: int, x: Fraction, truncate: bool = True) -> Fraction:
    """Σ_{k=1}^{n} (−1)^{k−1} C(n,k) (1 − kx)^{n−1}, keeping only 1 − kx > 0 when ``truncate``."""
    total = Fraction(0)
    for k in range(1, n + 1):
        base = 1 - k * x
        if truncate and base <= 0:
            break  # 1 − kx only decreases with k
        total += (-1) ** (k - 1) * math.comb(n, k) * base ** (n - 1)
    return total


def sector_prob_exact(n: int, frac: Fraction) -> Fraction:
    """Exact P_n(θ) as a Fraction, for frac = θ/(2π) rational in (0, 1]."""
    n, frac = _check_n(n), _check_frac(frac)
    if frac >= Fraction(n - 1, n):  # pigeonhole (also n = 1): the largest gap is ≥ 1/n ≥ x
        return Fraction(1)
    if frac <= Fraction(1, 2):  # only k = 1 survives
        return n * frac ** (n - 1)
    return inclusion_exclusion(n, 1 - frac)


def is_certain(n: int, theta: float) -> bool:
    """θ ≥ 2π(n−1)/n (or n = 1): the largest of n gaps is ≥ 1/n turn, so P = 1 (pigeonhole)."""
    return theta >= TAU * (n - 1) / n


def sector_prob(n: int, theta: float) -> float:
    """P_n(θ) as a float for θ in radians, 0 < θ ≤ 2π (exact rational sum of the float θ/2π)."""
    n, theta = _check_n(n), _check_theta(theta)
    if is_certain(n, theta):
        return 1.0
    f = theta / TAU
    if f <= 0.5:
        return n * f ** (n - 1)
    # π < θ: an alternating sum with binomial weights cancels badly in floats for large n;
    # evaluate it exactly on the (exactly representable) float f instead.
    return float(sector_prob_exact(n, Fraction(f)))


def degrees_to_frac(degrees: float | Fraction) -> Fraction:
    """θ in degrees → θ/2π as an exact Fraction (floats are taken at their exact binary value)."""
    return Fraction(degrees) / 360


@lru_cache(maxsize=None)
def sorting_network(m: int) -> tuple[tuple[int, int], ...]:
    """Batcher odd–even merge sort comparators (i < j: min to i) for m inputs."""
    pairs: list[tuple[int, int]] = []
    size = 1
    while size < m:
        size *= 2
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and b < m:  # b ≥ m is a +inf pad: no-op
                        pairs.append((a, b))
            k //= 2
        p *= 2
    return tuple(pairs)


def _max_gap_u32(rows: np.ndarray, spare: np.ndarray) -> np.ndarray:
    """Largest of the m+1 circular gaps cut by m rows of uint32 angles; returns a (b,) row.

    rows: (m, b) uint32 angles in units of 2^-32 turn, clobbered; the circle is cut at 0 (the
    dropped point). spare: (2, b) uint32 scratch. Differences wrap modulo 2^32.
    """
    m = rows.shape[0]
    s = list(rows)  # row views; comparators swap references instead of copying
    free, best = spare[0], spare[1]
    if m > NETWORK_MAX_ROWS:
        s = list(np.sort(rows.T, axis=1).T)  # long networks lose to a real sort
    else:
        for i, j in sorting_network(m):
            np.minimum(s[i], s[j], out=free)
            np.maximum(s[i], s[j], out=s[j])
            s[i], free = free, s[i]
    np.copyto(best, s[0])  # first gap: 0 → s_0
    for k in range(1, m):
        np.subtract(s[k], s[k - 1], out=free)
        np.maximum(best, free, out=best)
    np.negative(s[m - 1], out=free)  # wrap-around gap 2^32 − s_{m−1}
    np.maximum(best, free, out=best)
    return best


def sector_mc_count(n: int, theta: float, samples: int, rng: np.random.Generator,
                    batch: int = MC_BATCH) -> int:
    """Monte Carlo: how many of ``samples`` n-point sets fit in a sector of angle θ (radians).

    Rotation invariance: cut the circle at one point, so only n−1 angles are drawn per set
    (ALGORITHMS.md §5, reduction 3); a set fits iff its largest circular gap is ≥ 2π − θ.
    Angles are 32-bit fixed-point turns (φ = 2π·k/2^32, two per raw PCG64 word), sorted with a
    min/max network across rows; memory is O(n · batch). Discretisation bias is O(n²·2^-32).
    """
    n, theta = _check_n(n), _check_theta(theta)
    samples = operator.index(samples)
    if samples < 0:
        raise ValueError(f"samples must be ≥ 0, got {samples}")
    if batch < 2 or batch % 2:
        raise ValueError(f"batch must be an even integer ≥ 2, got {batch}")
    if is_certain(n, theta):
        return samples  # the largest of n gaps is ≥ 1/n turn (pigeonhole)
    x = 1.0 - theta / TAU  # required gap, turns
    need = min(math.ceil(x * 2.0**32), 2**32 - 1)  # gap ≥ x  ⇔  integer gap ≥ need
    threshold = np.uint32(need)
    m = n - 1
    bits = rng.bit_generator
    spare = np.empty((2, batch), dtype=np.uint32)
    hits = 0
    done = 0
    while done < samples:
        b = min(batch, samples - done)
        words = (m * b + 1) // 2
        rows = bits.random_raw(words).view(np.uint32)[: m * b].reshape(m, b)  # (m, b)
        best = _max_gap_u32(rows, spare[:, :b])
        hits += int(np.count_nonzero(best >= threshold))
        done += b
    return hits


def sector_mc_count_reference(n: int, theta: float, samples: int,
                              rng: np.random.Generator) -> int:
    """Plain Monte Carlo as written in ALGORITHMS.md: n float64 angles, np.sort, all n gaps."""
    n, theta = _check_n(n), _check_theta(theta)
    hits = 0
    for start in range(0, samples, MC_BATCH):
        b = min(MC_BATCH, samples - start)
        phi = np.sort(rng.uniform(0.0, TAU, size=(b, n)), axis=1)  # (b, n) radians
        gaps = np.diff(phi, axis=1, append=phi[:, :1] + TAU)  # (b, n), last = wrap-around
        hits += int(np.count_nonzero(gaps.max(axis=1) >= TAU - theta))
    return hits
