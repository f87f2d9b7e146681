"""Export one Ray Train checkpoint of a kgclue-pipeline run for ``--from-run`` evaluation.

    python scripts/export_checkpoint.py RUN_OUT DEST [--step N]

RUN_OUT is a kgclue-pipeline ``--out`` whose training is still going (or was cut short);
DEST gets ``model/`` (with its manifest) and ``vocab/``, so that
``python -m flows.kgclue --from-run DEST ...`` scores that checkpoint without training.
The generator's Ray run (``ray/seq2seq-*``) is exported; the re-rankers' runs beside it are
ignored (``--task ranker --run-name NAME`` picks one of those instead). Every file is copied to
a temporary name and renamed; each directory's manifest is written last.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.storage import MANIFEST, atomic_path, write_manifest  # noqa: E402
from tasks.train import MODEL_CONFIG, MODEL_FILE  # noqa: E402


def copy_dir_atomically(src: Path, dst: Path) -> None:
    """A manifest directory copied file by file (temp name + rename), its manifest last: a
    reader sees the old complete copy, no manifest (incomplete), or the new complete copy."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / MANIFEST).unlink(missing_ok=True)
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != MANIFEST)
    for f in [*files, src / MANIFEST]:
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(f, tmp)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_out", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--step", type=int, help="default: the latest checkpoint")
    ap.add_argument("--task", default="seq2seq", help="which training to export (the Ray run's prefix)")
    ap.add_argument("--run-name", help="the Ray run's directory name, when RUN_OUT holds several of that task")
    a = ap.parse_args(argv)
    snaps = sorted((a.run_out / "ray").glob(f"{a.run_name or a.task + '-*'}/checkpoint_manager_snapshot.json"))
    if len(snaps) != 1:
        have = sorted(p.parent.name for p in (a.run_out / "ray").glob("*/checkpoint_manager_snapshot.json"))
        ap.error(f"{a.run_out}/ray: expected one {a.run_name or a.task} training run, found {len(snaps)} "
                 f"(runs there: {have}); pass --run-name NAME")
    snap = json.loads(snaps[0].read_text())
    results = snap["checkpoint_results"]
    pick = [r for r in results if a.step is None or r["metrics"]["step"] == a.step]
    if not pick:
        ap.error(f"no checkpoint at step {a.step}; have {[r['metrics']['step'] for r in results]}")
    chosen = max(pick, key=lambda r: r["metrics"]["step"])
    ckpt = snaps[0].parent / chosen["checkpoint_dir_name"]
    (a.dest / "model").mkdir(parents=True, exist_ok=True)
    (a.dest / "model" / MANIFEST).unlink(missing_ok=True)  # incomplete until the manifest is rewritten
    for f in (MODEL_FILE, MODEL_CONFIG):
        with atomic_path(a.dest / "model" / f) as tmp:  # temp name + rename, like every output
            shutil.copyfile(ckpt / f, tmp)
    copy_dir_atomically(a.run_out / "vocab", a.dest / "vocab")
    write_manifest(a.dest / "model", [MODEL_FILE, MODEL_CONFIG], run_name=snaps[0].parent.name,
                   steps=chosen["metrics"]["step"], final_loss=chosen["metrics"]["loss"], checkpoint=str(ckpt),
                   tokens_per_s=None)
    print(f"exported {snaps[0].parent.name} step {chosen['metrics']['step']} -> {a.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
