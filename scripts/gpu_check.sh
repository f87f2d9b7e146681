#!/usr/bin/env bash
# GPU check of the KgCLUE spine, prepared for a session that is lent a device machine (NOT RUN
# YET: no session so far had one). Within ~5 minutes on one H100/H200 it runs:
#   1. kgclue-pipeline, preset gpu (104M generator), shortened: Ray Train with 1 GPU worker,
#      NCCL, bf16, DeepSpeed ZeRO-2 (the preset's stage), DS_ACCELERATOR=cuda set on the worker
#      by the trainer from the spec (tasks/train.py), then evaluation on dev;
#   2. the decode benchmark (bench/decode.py) of that trained run, written to $OUT/decode.json.
# The device image has torch but not ray/deepspeed/prefect/pyarrow at the project's pins: carry
# them as wheels first (see ../.library/device/README.md, "a Python package missing there"):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     ray==2.60.0 deepspeed==0.19.8 prefect==3.9.1 pyarrow==26.0.1 hjson ninja py-cpuinfo msgpack ...
# then call the device tool with carry [".whl"] and this script as the command.
set -euo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
DATA=shared/data/kgclue
[ -f "$DATA/train.json" ] || DATA=""
python3 -m flows.kgclue --preset gpu --use-gpu --num-workers 1 --steps 300 --ranker-steps 100 --rankers 1 \
  ${DATA:+--data-dir "$DATA"} --out "$OUT/run" 2>&1 | tail -20
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
m = json.loads((out / "run" / "metrics.json").read_text())
keep = {k: m[k] for k in ("score", "train_tokens_per_s", "train_steps", "accelerator", "decode_questions_per_s")}
keep["card"] = (out / "gpu.txt").read_text().splitlines()[-1]
json.dump(keep, open(out / "gpu-train.json", "w"), indent=2)
print(json.dumps(keep, indent=2))
PY
python3 -m bench.decode --run "$OUT/run" --n-questions 512 --repeat 1 --json "$OUT/decode.json" | tail -5
