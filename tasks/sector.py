"""Sector-probability Monte Carlo on Ray: seeded blocks, sharded, identical totals for any shard count.

Each cell's samples are cut into fixed-size blocks; block b of cell (n, θ) draws from
PCG64(SeedSequence([seed, n, bits(θ), b])). A shard is just a disjoint set of blocks, so the
summed integer counts do not depend on how many shards (or which machines) did the work.
"""
from __future__ import annotations

import math
import os
import struct
import time
from fractions import Fraction
from typing import Any, Iterable, Sequence

import numpy as np
import ray

from models.sector import TAU, is_certain, sector_mc_count, sector_prob, sector_prob_exact
from tasks import ray_runtime

BLOCK_SAMPLES = 1 << 20  # point-sets per seeded block: the unit of work and of reproducibility

Cell = tuple[int, float]  # (n points, θ radians)
Item = tuple[int, int, int]  # (cell index, block index, block length)


def theta_key(theta: float) -> int:
    """The IEEE-754 bits of θ as an int: a seed word that names θ exactly."""
    return struct.unpack("<Q", struct.pack("<d", float(theta)))[0]


def block_rng(seed: int, n: int, theta: float, block: int) -> np.random.Generator:
    """The generator of one block, a pure function of (seed, n, θ, block)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, n, theta_key(theta), block])))


def plan_blocks(num_cells: int, samples_per_cell: int) -> list[Item]:
    """All (cell, block, length) work items, block-major so round-robin shards stay balanced."""
    nblocks = math.ceil(samples_per_cell / BLOCK_SAMPLES)
    return [(c, b, min(BLOCK_SAMPLES, samples_per_cell - b * BLOCK_SAMPLES))
            for b in range(nblocks) for c in range(num_cells)]


def count_blocks(grid: Sequence[Cell], items: Iterable[Item], seed: int) -> dict[str, Any]:
    """Plain shard body: hits and samples per cell, plus kernel seconds per n."""
    hits = [0] * len(grid)
    samples = [0] * len(grid)
    busy: dict[int, list[float]] = {}  # n -> [simulated samples, seconds]
    for c, b, length in items:
        n, theta = grid[c]
        t0 = time.perf_counter()
        hits[c] += sector_mc_count(n, theta, length, block_rng(seed, n, theta, b))
        dt = time.perf_counter() - t0
        samples[c] += length
        if not is_certain(n, theta):  # certain cells are not simulated: keep them out
            acc = busy.setdefault(n, [0.0, 0.0])
            acc[0] += length
            acc[1] += dt
    return {"hits": hits, "samples": samples, "busy": busy}


@ray.remote(num_cpus=1)
def count_shard(grid: Sequence[Cell], items: list[Item], seed: int) -> dict[str, Any]:
    """Ray task: one shard of blocks (see count_blocks), tagged with the node it ran on."""
    return {**count_blocks(grid, items, seed), "node": ray.get_runtime_context().get_node_id()}


@ray.remote(num_cpus=1)
def _warm() -> int:
    """Start a worker and run the kernel once before the clock starts."""
    sector_mc_count(4, math.pi, 1 << 12, np.random.default_rng(0))
    return os.getpid()


def ensure_ray(ray_address: str | None = None) -> int:
    """Start or join Ray (tasks.ray_runtime: loopback-only when local); return its CPU count."""
    ray_runtime.ensure_ray(ray_address)
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def summarise_cell(n: int, theta: float, hits: int, samples: int) -> dict[str, Any]:
    """{n, theta, exact, estimate, stderr, samples, z}; stderr = sqrt(p(1−p)/N) at the exact p."""
    # exact on the float θ/2π; "certain" uses the kernel's own test so both agree at 2π(n−1)/n
    p = Fraction(1) if is_certain(n, theta) else sector_prob_exact(n, Fraction(theta / TAU))
    q = float(1 - p)  # 1 − p without cancellation
    p_f = float(p)
    estimate = hits / samples if samples else float("nan")
    stderr = math.sqrt(p_f * q / samples) if samples else float("nan")
    if stderr > 0:
        z = (estimate - p_f) / stderr
    else:  # p = 1: every set must fit
        z = 0.0 if hits == samples else float("inf")
    return {"n": n, "theta": theta, "exact": p_f, "estimate": estimate, "stderr": stderr,
            "samples": samples, "z": z}


def run_grid(grid: Sequence[Cell], samples_per_cell: int, shards: int, seed: int,
             ray_address: str | None = None) -> dict[str, Any]:
    """Fan the grid out over ``shards`` Ray tasks and aggregate.

    Returns {"grid": [cell summaries], "samples", "wall_s", "cores", "samples_per_s_per_core",
    "kernel_samples_per_s_by_n"}; wall_s covers the sampling only (after Ray start and warm-up).
    """
    grid = [(int(n), float(theta)) for n, theta in grid]
    for n, theta in grid:
        sector_prob(n, theta)  # validates n and θ before any work is sent
    if samples_per_cell < 1 or shards < 1 or seed < 0:
        raise ValueError(f"need samples_per_cell ≥ 1, shards ≥ 1, seed ≥ 0; got "
                         f"{samples_per_cell}, {shards}, {seed}")
    items = plan_blocks(len(grid), samples_per_cell)
    parts = [items[s::shards] for s in range(shards)]
    parts = [p for p in parts if p]
    cores = min(len(parts), ensure_ray(ray_address))
    ray.get([_warm.remote() for _ in range(cores)])

    t0 = time.perf_counter()
    grid_ref = ray.put(grid)
    spread = count_shard.options(scheduling_strategy="SPREAD")  # across every node of a cluster
    results = ray.get([spread.remote(grid_ref, p, seed) for p in parts])
    wall = time.perf_counter() - t0

    hits, samples = [0] * len(grid), [0] * len(grid)
    busy: dict[int, list[float]] = {}
    for r in results:
        for c in range(len(grid)):
            hits[c] += r["hits"][c]
            samples[c] += r["samples"][c]
        for n, (k, dt) in r["busy"].items():
            acc = busy.setdefault(int(n), [0.0, 0.0])
            acc[0] += k
            acc[1] += dt
    simulated = sum(k for k, _ in busy.values())
    return {
        "grid": [summarise_cell(n, th, h, s) for (n, th), h, s in zip(grid, hits, samples)],
        "samples": sum(samples),
        "simulated_samples": int(simulated),
        "wall_s": wall,
        "cores": cores,
        "samples_per_s_per_core": simulated / wall / cores,
        "kernel_samples_per_s_by_n": {str(n): k / dt for n, (k, dt) in sorted(busy.items()) if dt > 0},
        "nodes": len({r["node"] for r in results}),
    }
