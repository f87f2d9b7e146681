"""Starting or joining Ray, one way for every flow (training, the sector Monte Carlo, ...)."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` (or RAY_ADDRESS), else start a local Ray on loopback.

    A local Ray runs without its dashboard unless ``TRIEFLOW_RAY_DASHBOARD=1``; either way the
    dashboard host is pinned to 127.0.0.1 (reach it from elsewhere through an SSH tunnel).
    A local Ray is a one-node cluster, so its node address is made loopback too: Ray 2.60
    otherwise resolves 127.0.0.1 to the host's first interface and listens on all interfaces
    (GCS, raylet, workers, agents, the dashboard's metrics port). ``RAY_ENABLE_WINDOWS_OR_OSX_
    CLUSTER=0`` is Ray's own single-machine switch (set it to 1 to opt out); Ray reads it at
    import, so the already imported constant is set as well.
    """
    import ray
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"working_dir": str(ROOT),
                                               "excludes": [".venv", "runs", ".prefect", ".git"]})
    else:
        dashboard = os.environ.get("TRIEFLOW_RAY_DASHBOARD", "").strip().lower() in ("1", "true", "yes", "on")
        if os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0").strip().lower() in ("0", "false"):
            from ray._private import ray_constants
            ray_constants.ENABLE_RAY_CLUSTER = False  # node address 127.0.0.1: every socket on loopback
        ray.init(num_cpus=os.cpu_count(), include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
