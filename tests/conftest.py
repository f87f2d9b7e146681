"""Shared, session-scoped real services: one Prefect test server, one local Ray."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Before prefect is imported anywhere: an isolated PREFECT_HOME for the whole test session.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="trieflow-prefect-"))
import flows  # noqa: E402,F401  (the rest of the embedded defaults)

KGCLUE = ROOT.parent / "shared" / "data" / "kgclue"


@pytest.fixture(scope="session")
def kgclue_dir() -> Path:
    if not (KGCLUE / "train.json").is_file():
        pytest.skip(f"KgCLUE files not found at {KGCLUE}")
    return KGCLUE


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def ray_local():
    import ray
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def stdlib_text(n_lines: int) -> str:
    """The first ``n_lines`` lines of this interpreter's standard-library ``.py`` files, sorted by
    name: real, offline text for the byte-level LM tests."""
    import sysconfig
    lines: list[str] = []
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        lines.extend(p.read_text("utf-8", errors="replace").splitlines(keepends=True))
        if len(lines) >= n_lines:
            break
    return "".join(lines[:n_lines])
