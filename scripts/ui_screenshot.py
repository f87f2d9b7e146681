"""Headless-Chromium screenshot of a flow run's page in the Prefect UI (not part of CI).

    python scripts/ui_screenshot.py [--out runs/ui/flow-run.png] [--flow-run-id ID]
                                    [--deployment data-prep/sample] [--api http://127.0.0.1:4200/api]

Talks to a running server (``make stack-up``; PREFECT_API_URL or --api). Picks ``--flow-run-id``,
else the most recent COMPLETED flow run, else runs ``--deployment`` once (``--watch``) and uses
that run. Then loads ``<ui>/runs/flow-run/<id>`` in headless Chromium (Debian package
``chromium``: ``apt-get install -y chromium``) and writes the PNG atomically.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    sys.exit("ui_screenshot: no Chromium found; install it with `apt-get install -y chromium` "
             "(Debian; check `apt-cache policy chromium` first)")


def latest_completed_run(api: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))),
            sort=FlowRunSort.END_TIME_DESC, limit=1)
    return runs[0].id if runs else None


def run_deployment(name: str, timeout_s: int) -> str:
    from prefect.deployments import run_deployment as _run

    run = _run(name, timeout=timeout_s)
    if run.state is None or not run.state.is_completed():
        sys.exit(f"ui_screenshot: {name} ended in {run.state!r}")
    return str(run.id)


def screenshot(browser: str, url: str, out: Path, width: int, height: int, wait_ms: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ui-shot-") as tmp:
        shot = Path(tmp) / "shot.png"
        cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", "--no-first-run", "--no-default-browser-check",
               f"--user-data-dir={tmp}/profile", f"--window-size={width},{height}",
               f"--virtual-time-budget={wait_ms}", f"--screenshot={shot}", url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0 or not shot.is_file():
            sys.exit(f"ui_screenshot: chromium failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
        tmp_out = out.with_name(f".{out.name}.tmp")
        shutil.copyfile(shot, tmp_out)
        os.replace(tmp_out, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "ui" / "flow-run.png")
    ap.add_argument("--api", default=os.environ.get("PREFECT_API_URL")
                    or f"http://127.0.0.1:{os.environ.get('PORT', '4200')}/api")
    ap.add_argument("--flow-run-id", help="default: the latest completed flow run")
    ap.add_argument("--deployment", default="data-prep/sample", help="run this if there is no completed run")
    ap.add_argument("--timeout", type=int, default=600, help="seconds to wait for that run")
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, default=1000)
    ap.add_argument("--wait-ms", type=int, default=20000, help="virtual time for the UI to load its data")
    a = ap.parse_args(argv)

    os.environ["PREFECT_API_URL"] = a.api
    browser = find_browser()
    run_id = a.flow_run_id or latest_completed_run(a.api)
    if run_id is None:
        print(f"ui_screenshot: no completed flow run yet; running {a.deployment}", file=sys.stderr)
        run_id = run_deployment(a.deployment, a.timeout)
    ui = a.api.rstrip("/").removesuffix("/api")
    url = f"{ui}/runs/flow-run/{run_id}"
    t0 = time.perf_counter()
    screenshot(browser, url, a.out, a.width, a.height, a.wait_ms)
    print(f"ui_screenshot: {url} -> {a.out} ({a.out.stat().st_size} bytes, {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
