"""Re-draw the long-context plot from committed results, one line per kind, when kinds were
trained in different rounds (one flow's metrics.json, then single-kind runs that replace or add
a kind):

    .venv/bin/python -m bench.long_context_plot --flow bench/results/long-context-base.json \
        --run vq=bench/results/long-context-base-vq-window-rope.json --out bench/results/long-context-base.png

Nothing is trained or evaluated here: the lines are the JSONs' ``eval`` rows, drawn by the flow's
own :func:`flows.long_context_lm.plot_lengths`. Every run must share the flow's training length.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def merge_runs(flow: dict, extra: list[tuple[str, dict]]) -> dict[str, dict]:
    """The flow's runs by kind, with each (label, single-kind metrics) laid over them in order."""
    runs = dict(flow["runs"])
    for label, m in extra:
        if m.get("train_len") != flow["train_len"]:
            raise SystemExit(f"run {label!r} was trained at N = {m.get('train_len')}, the flow at "
                             f"N = {flow['train_len']}: lines at different N do not share an axis")
        if not m.get("eval"):
            raise SystemExit(f"run {label!r} has no eval rows (is it a long-context-lm metrics.json?)")
        runs[label] = m
    return runs


def parse_run(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"--run {text!r}: expected LABEL=PATH, e.g. vq=bench/results/x.json")
    return label, Path(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flow", type=Path, required=True, help="a long-context-lm flow's metrics.json (with runs)")
    ap.add_argument("--run", type=parse_run, action="append", default=[],
                    help="LABEL=PATH: a single-kind metrics.json drawn as LABEL (replaces the flow's LABEL)")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = ap.parse_args(argv)
    from flows.long_context_lm import plot_lengths

    flow = json.loads(args.flow.read_text())
    runs = merge_runs(flow, [(label, json.loads(path.read_text())) for label, path in args.run])
    plot_lengths(runs, flow["train_len"], args.out)
    print(json.dumps({"out": str(args.out), "kinds": list(runs),
                      "bpc_at_N": {k: round(r["eval"][0]["bpc"], 3) for k, r in runs.items()}}))


if __name__ == "__main__":
    main()
