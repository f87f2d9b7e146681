"""Table artifacts stay small enough for Prefect's event bus: long tables are thinned evenly."""
from __future__ import annotations

import pytest

from tasks import reporting


def test_thin_keeps_first_last_and_spacing():
    rows = list(range(14_001))
    out = reporting.thin(rows, 1000)
    assert len(out) == 1000 and out[0] == 0 and out[-1] == 14_000
    gaps = {b - a for a, b in zip(out, out[1:])}
    assert gaps <= {14, 15}  # even: 14,000 / 999 = 14.01
    assert reporting.thin(rows[:7], 1000) == rows[:7]  # short tables untouched
    assert reporting.thin(rows[:3], 2) == [0, 2]
    with pytest.raises(ValueError, match="max_rows=1"):
        reporting.thin(rows, 1)


def test_long_history_table_is_thinned_in_a_real_run(prefect_harness):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    rows = [{"step": 5 * i, "loss": 100.0 - i * 1e-3, "tokens_per_s": 1234.5, "lr": 1e-3} for i in range(14_000)]

    @flow(name="reporting-thin-test")
    def f():
        reporting.table("long-history", rows, "Training: loss per 5 steps")

    state = f(return_state=True)
    with get_client(sync_client=True) as client:
        (art,) = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    import json
    table = art.data if isinstance(art.data, list) else json.loads(art.data)
    assert len(table) == reporting.MAX_TABLE_ROWS
    assert table[0]["step"] == 0 and table[-1]["step"] == 5 * 13_999
    assert "1000 of 14000 rows" in art.description
