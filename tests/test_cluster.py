"""Multi-node on one machine: a real head + second Ray node; training and the sector flow span both."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_two_node_cluster_training_and_sector(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # AF_UNIX socket paths must stay < 108 bytes
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": ray_tmp}
    out = subprocess.run([sys.executable, "-m", "tests.scenarios.two_node_cluster", str(tmp_path / "work")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["alive_nodes"] == 2
    assert r["train_ranks"] == [0, 1] and len(r["train_nodes"]) == 2, "each rank on its own node"
    assert r["train_steps"] == 10
    assert r["sector_nodes"] == 2, "sector shards ran on both nodes"
    assert all(abs(z) < 4 for z in r["sector_z"])
