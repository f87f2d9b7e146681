"""Prefect artifacts (tables, markdown, progress) with keys lowercase-with-dashes.

Outside a flow or task run these become no-ops that log instead, so the plain functions in
tasks/ stay callable from scripts and tests.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Sequence
from uuid import UUID

log = logging.getLogger("trieflow")
_KEY = re.compile(r"^[a-z0-9-]+$")


def _in_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _check(key: str) -> str:
    if not _KEY.match(key):
        raise ValueError(f"artifact key '{key}': use lowercase letters, digits and dashes")
    return key


#: Most rows one table artifact holds. Prefect refuses to publish an event over ~1.5 MB
#: ("Refusing to publish event of size ...") and the UI renders a long table slowly; a 30-minute
#: MNIST training logs ~14,000 history rows (2.3 MB). Longer tables are thinned evenly.
MAX_TABLE_ROWS = 1000


def thin(rows: Sequence[Any], max_rows: int = MAX_TABLE_ROWS) -> list[Any]:
    """At most ``max_rows`` of ``rows``, evenly spaced, always keeping the first and the last."""
    n = len(rows)
    if max_rows < 2:
        raise ValueError(f"thin: max_rows={max_rows}; keep at least 2 (the first and the last row)")
    if n <= max_rows:
        return list(rows)
    idx = sorted({round(i * (n - 1) / (max_rows - 1)) for i in range(max_rows)})
    return [rows[i] for i in idx]


def table(key: str, rows: Sequence[dict[str, Any]], description: str = "",
          max_rows: int = MAX_TABLE_ROWS) -> None:
    if not _in_run():
        log.info("%s: %d rows", key, len(rows))
        return
    from prefect.artifacts import create_table_artifact
    shown = thin(rows, max_rows)
    if len(shown) < len(rows):
        description = f"{description} ({len(shown)} of {len(rows)} rows, evenly spaced, first and last kept)".strip()
    create_table_artifact(key=_check(key), table=[dict(r) for r in shown], description=description)


def markdown(key: str, text: str, description: str = "") -> None:
    if not _in_run():
        log.info("%s:\n%s", key, text)
        return
    from prefect.artifacts import create_markdown_artifact
    create_markdown_artifact(key=_check(key), markdown=text, description=description)


def progress(key: str, percent: float, description: str = "") -> UUID | None:
    if not _in_run():
        return None
    from prefect.artifacts import create_progress_artifact
    return create_progress_artifact(progress=float(percent), key=_check(key), description=description)


def update_progress(artifact_id: UUID | None, percent: float, description: str | None = None) -> None:
    if artifact_id is None:
        return
    from prefect.artifacts import update_progress_artifact
    update_progress_artifact(artifact_id=artifact_id, progress=float(min(100.0, percent)),
                             description=description)


def md_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table from a list of dicts (keys of the first row are the columns)."""
    if not rows:
        return "_(none)_\n"
    cols = list(rows[0])
    esc = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(esc(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"
