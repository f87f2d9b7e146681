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


def table(key: str, rows: Sequence[dict[str, Any]], description: str = "") -> None:
    if not _in_run():
        log.info("%s: %d rows", key, len(rows))
        return
    from prefect.artifacts import create_table_artifact
    create_table_artifact(key=_check(key), table=[dict(r) for r in rows], description=description)


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
