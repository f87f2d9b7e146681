"""bench.long_context_plot: the committed flow results plus later single-kind runs, one plot."""
from __future__ import annotations

import json

import pytest

from bench.long_context_plot import main, merge_runs
from tests.conftest import ROOT

RESULTS = ROOT / "bench" / "results"


def test_replaces_and_adds_kinds_and_draws(tmp_path, capsys):
    out = tmp_path / "lc.png"
    main(["--flow", str(RESULTS / "long-context-base.json"),
          "--run", f"vq={RESULTS / 'long-context-base-vq-window-rope.json'}",
          "--run", f"vq exact window={RESULTS / 'long-context-base-vq-window-rope-exact.json'}", "--out", str(out)])
    printed = json.loads(capsys.readouterr().out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert printed["kinds"] == ["alibi", "hwfa", "performer", "softmax", "vq", "vq exact window"]
    want = json.loads((RESULTS / "long-context-base-vq-window-rope.json").read_text())["eval"][0]["bpc"]
    assert printed["bpc_at_N"]["vq"] == round(want, 3)  # the flow's old vq line was replaced


def test_refuses_runs_at_another_length():
    flow = {"train_len": 128, "runs": {"softmax": {"eval": [{"bpc": 2.2}]}}}
    with pytest.raises(SystemExit, match="N = 64"):
        merge_runs(flow, [("vq", {"train_len": 64, "eval": [{"bpc": 3.0}]})])
    with pytest.raises(SystemExit, match="no eval rows"):
        merge_runs(flow, [("vq", {"train_len": 128, "eval": []})])
    with pytest.raises(SystemExit):
        main(["--flow", "x.json", "--run", "no-equals-sign", "--out", "y.png"])
