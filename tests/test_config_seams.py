"""Config-level seams of the spine review, checked without training: the `gpu` preset's values
and refusals, precision chosen by CPU capability, the validation slice, the `trieflow` command."""
from __future__ import annotations

import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from flows.kgclue import KgcluePipelineConfig, _ranker_spec, _train_spec

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def listening_address():
    """A TCP port that accepts connections: what the config's cluster check asks of an address
    (a GPU cluster's head, when this machine has no GPU)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    try:
        yield f"127.0.0.1:{srv.getsockname()[1]}"
    finally:
        srv.close()


def test_gpu_preset_needs_use_gpu_and_a_gpu_or_a_cluster(tmp_path):
    with pytest.raises(ValidationError, match="add --use-gpu"):
        KgcluePipelineConfig(preset="gpu", out=tmp_path)
    import torch
    if not torch.cuda.is_available():
        with pytest.raises(ValidationError, match="no GPU here and no ray_address"):
            KgcluePipelineConfig(preset="gpu", out=tmp_path, use_gpu=True)


def test_gpu_preset_trains_with_cuda_nccl_bf16_and_zero2(tmp_path, listening_address):
    cfg = KgcluePipelineConfig(preset="gpu", out=tmp_path, use_gpu=True, ray_address=listening_address)
    from tasks.train import TrainSpec
    gen = TrainSpec(**{**_train_spec(cfg, str(tmp_path / "vocab")), "splits": ("train",)})
    assert (gen.zero_stage, gen.micro_batch, gen.use_gpu, gen.bf16) == (2, 128, True, True)
    assert gen.accelerator() == ("cuda", "nccl")
    ds = gen.ds_config()
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 2
    assert gen.model["d_model"] >= 512  # the 104M model, not the CPU presets'
    rk = TrainSpec(**{**_ranker_spec(cfg, str(tmp_path / "vocab")), "splits": ("train",)})
    assert rk.accelerator() == ("cuda", "nccl") and rk.bf16 and not rk.cpu_bf16
    # a CPU preset on the same machine stays on the CPU accelerator, fp32 for the generator
    cpu = TrainSpec(**{**_train_spec(KgcluePipelineConfig(preset="tiny", out=tmp_path), "v"), "splits": ("train",)})
    assert cpu.accelerator() == ("cpu", "gloo") and not cpu.bf16 and cpu.zero_stage == 1


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_cpu_precision_follows_the_cpus_capability(tmp_path):
    from tasks.hw import choose_cpu_bf16, cpu_label, native_cpu_bf16
    native = native_cpu_bf16()
    if Path("/proc/cpuinfo").is_file() and not {"avx512_bf16", "amx_bf16", "amx_tile"} & _cpu_flags():
        assert native is False, "no bf16 instruction in the CPU flags, yet bf16 was reported native"
    assert choose_cpu_bf16("auto") is native
    assert choose_cpu_bf16("on") is True and choose_cpu_bf16("off") is False
    with pytest.raises(ValueError, match="choose auto, on or off"):
        choose_cpu_bf16("fast")
    assert ("bf16 native" if native else "bf16 emulated") in cpu_label()
    for req, want in (("auto", native), ("on", True), ("off", False)):
        cfg = KgcluePipelineConfig(preset="tiny", out=tmp_path, cpu_precision=req)
        assert _ranker_spec(cfg, "v")["cpu_bf16"] is want, req


def test_validation_slice_is_seeded_relation_disjoint_and_conserves_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.validation import VAL, held_out_predicates, labelled_rows
    preds = [f"p{i}" for i in range(200)]
    a = held_out_predicates(preds * 3, 0.1, seed=0)
    assert a == held_out_predicates(list(reversed(preds)), 0.1, seed=0)  # a function of the set and seed
    assert len(a) == 20 and a != held_out_predicates(preds, 0.1, seed=1)
    assert len(held_out_predicates(["x", "y"], 0.01, 0)) == 1  # never empty ...
    assert len(held_out_predicates(["x", "y"], 0.9, 0)) == 1   # ... never all of train
    rng = np.random.default_rng(0)
    rows = [{"split": "train", "id": i, "question": f"q{i}", "subject": f"s{i}",
             "predicate": preds[int(rng.integers(200))], "object": "o"} for i in range(3000)]
    rows.append({**rows[0], "id": 3000, "subject": None})  # unlabelled rows never enter either side
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    hold = {"frac": 0.1, "seed": 0}
    train = labelled_rows(tmp_path, ["train"], hold)
    val = labelled_rows(tmp_path, [VAL], hold)
    assert not {r["predicate"] for r in train} & {r["predicate"] for r in val}
    assert {r["predicate"] for r in val} <= a
    assert sorted(r["id"] for r in train + val) == list(range(3000))
    assert 0.05 < len(val) / 3000 < 0.15
    assert Counter(r["predicate"] for r in labelled_rows(tmp_path, ["train"])) == \
        Counter(r["predicate"] for r in train + val)
    with pytest.raises(ValueError, match="needs a holdout"):
        labelled_rows(tmp_path, [VAL])


def test_trieflow_lists_every_flow_of_prefect_yaml_and_runs_one():
    import importlib

    import yaml
    out = subprocess.run([sys.executable, "-m", "flows.cli", "list"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    listed = {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
    deployed = set()
    for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]:
        path, func = d["entrypoint"].split(":")
        deployed.add(getattr(importlib.import_module(path[:-3].replace("/", ".")), func).name)
    assert deployed and deployed <= listed, f"deployed flows the command does not list: {deployed - listed}"
    from flows import cli
    for name, (module, _line, *entry) in cli.available().items():
        assert callable(getattr(importlib.import_module(module), entry[0] if entry else "main")), name
    bad = subprocess.run([sys.executable, "-m", "flows.cli", "run", "no-such-flow"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "available:" in bad.stderr
    helped = subprocess.run([sys.executable, "-m", "flows.cli", "run", "train-seq2seq", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--preset" in helped.stdout
