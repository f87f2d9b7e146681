"""A real two-node Ray cluster on one machine (head + a second raylet on loopback).

Run as a script (its own process, so its cluster never meets the test session's local Ray):
a 2-worker Ray Train + DeepSpeed stage whose workers must land on different nodes (each node
has one CPU), then the sector Monte Carlo spread over both. Prints one JSON line.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import flows  # noqa: F401  (embedded defaults)


def main(workdir: str) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from models.seq2seq import PRESETS
    from tasks.sample import prepare_training_set
    from tasks.sector import run_grid
    from tasks.train import TrainSpec, train

    root = Path(workdir)
    prepare_training_set(root, n_train=200, n_dev=20, n_test=5, k=2)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": str(Path.cwd())}})
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        small = dict(PRESETS["tiny"], d_model=64, d_ff=128, n_layer_enc=1, n_layer_dec=1)
        spec = TrainSpec(data_dir=str(root / "data"), vocab_dir=str(root / "vocab"), model=small, steps=10,
                         micro_batch=8, num_workers=2, zero_stage=2, checkpoint_every=10)
        res = train(spec, str(root / "ray"), ray_address=cluster.address)
        sector = run_grid([(4, 3.141592653589793), (3, 4.0)], samples_per_cell=1 << 21, shards=8, seed=0)
        return {"alive_nodes": len(nodes), "train_nodes": sorted({p["node_id"] for p in res.placements}),
                "train_ranks": sorted(p["rank"] for p in res.placements), "train_steps": res.history[-1]["step"],
                "sector_nodes": sector["nodes"], "sector_z": [c["z"] for c in sector["grid"]]}
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(main(sys.argv[1] if len(sys.argv) > 1 else tmp)))
