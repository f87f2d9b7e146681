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
}
# DS_ACCELERATOR is not set here: the trainer sets it on each Ray worker from the spec
# (cpu, or cuda for use_gpu), so a GPU machine is never pinned to DeepSpeed's CPU accelerator.


def apply_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
