"""The data-prep flow end to end on a real (test) Prefect server."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from pydantic import ValidationError

from flows.data_prep import DataPrepConfig, data_prep, main
from tests.conftest import ROOT

METRIC_KEYS = {"rows", "quarantined", "kb_triples", "kb_subjects", "trie_keys"}


def _artifacts(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in arts}


def test_flow_on_real_kgclue(prefect_harness, kgclue_dir, tmp_path):
    cfg = DataPrepConfig(out=tmp_path, data_dir=kgclue_dir)
    state = data_prep(cfg, return_state=True)
    metrics = state.result()
    on_disk = json.loads((tmp_path / "metrics.json").read_text("utf-8"))
    assert on_disk == metrics and METRIC_KEYS <= set(metrics)
    assert metrics["rows"] == {"train": 18000, "dev": 2000, "test": 3000} and metrics["quarantined"] == 0
    assert metrics["kb_triples"] == metrics["trie_keys"] == 140000 and metrics["kb_subjects"] == 20000
    arts = _artifacts(state.state_details.flow_run_id)
    assert {"data-prep-counts", "data-prep-report"} <= set(arts)
    assert "18000" in str(arts["data-prep-counts"].data)
    t0 = time.perf_counter()  # a second run finds every stage done and recomputes nothing
    assert data_prep(cfg) == {**metrics, "wall_s": pytest.approx(metrics["wall_s"], abs=60)}
    assert time.perf_counter() - t0 < 30


def test_flow_with_labelled_files_and_hard_protocol(prefect_harness, kgclue_dir, tmp_path):
    metrics = data_prep(DataPrepConfig(out=tmp_path, data_dir=kgclue_dir, labelled=(kgclue_dir / "dev.json",),
                                       kb_protocol="hard"))
    assert metrics["rows"]["labelled-0-dev"] == 2000
    assert metrics["kb_protocol"] == "hard" and metrics["kb_triples"] > 2000 * 7
    kb_lines = (tmp_path / "kb.txt").read_text("utf-8").splitlines()
    assert len(kb_lines) == metrics["kb_triples"]


def test_flow_on_generated_sample_and_official_kb(prefect_harness, tmp_path):
    kb = tmp_path / "knowledge.txt"
    kb.write_text("张三（演员）\t性别\t男\n李四\t出生地\t北京\n坏行\n", "utf-8")
    metrics = data_prep(DataPrepConfig(out=tmp_path / "o", kb=kb, max_bad_fraction=0.5))
    assert metrics["kb_protocol"] == "official" and metrics["kb_triples"] == 2 and metrics["kb_quarantined"] == 1
    assert metrics["rows"]["train"] > 0  # generated KgCLUE-format sample


@pytest.mark.parametrize("kwargs,field", [
    ({"data_dir": "/nonexistent"}, "data_dir"),
    ({"kb": "/nonexistent.txt"}, "kb"),
    ({"kb_protocol": "medium"}, "kb_protocol"),
    ({"max_bad_fraction": 2}, "max_bad_fraction"),
    ({"kb_k": -1}, "kb_k"),
    ({"colour": "red"}, "colour"),
])
def test_bad_config_names_the_field(tmp_path, kwargs, field):
    t0 = time.perf_counter()
    with pytest.raises(ValidationError) as e:
        DataPrepConfig(out=tmp_path, **kwargs)
    assert field in str(e.value) and time.perf_counter() - t0 < 1


def test_cli_help_and_bad_args(capsys, tmp_path):
    out = subprocess.run([sys.executable, "-m", "flows.data_prep", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--kb-protocol" in out.stdout and "--labelled" in out.stdout
    assert main(["--out", str(tmp_path), "--data-dir", "/nonexistent"]) == 2
    assert "data_dir" in capsys.readouterr().err
