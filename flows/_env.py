"""Embedded defaults for running on one machine with no set-up.

Imported by ``flows/__init__.py`` before anything imports prefect or ray, so every flow
gets a project-local PREFECT_HOME and offline-safe settings. A value the user has already
exported always wins.
"""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

DEFAULTS = {
    "PREFECT_HOME": str(PROJECT_ROOT / ".prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_LEVEL": "INFO",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    # A local SQLite server answers 503 (SQLITE_BUSY_SNAPSHOT, which skips the busy timeout) while
    # many runs write at once; Prefect's client retries 503 with 2**n s back-off. Its default of 5
    # retries (~1 min) ran out once in CI with 20 concurrent runs on 2 cores; 8 waits up to ~8.5 min.
    "PREFECT_CLIENT_MAX_RETRIES": "8",
}
# DS_ACCELERATOR is not set here: the trainer sets it on each Ray worker from the spec
# (cpu, or cuda for use_gpu), so a GPU machine is never pinned to DeepSpeed's CPU accelerator.


def apply_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
