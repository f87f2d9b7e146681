#!/usr/bin/env bash
# GPU check of the vae-density flow, prepared for a session that is lent a device machine (NOT RUN
# YET). Within ~5 minutes on one H100/H200 it runs the gpu preset (the IWAE paper's model,
# 784-200-200-50 tanh, k = 50, batch 20), shortened to 3,000 steps, on the statically binarised
# MNIST read in place (../shared/data/binarized-mnist, or shared/data/... in the device copy):
# Ray Train with 1 GPU worker (NCCL), then the ELBO and IWAE_K bounds for K = 1..5000 on the
# 10,000 test images (on the GPU) and the exact baselines; $OUT/vae-gpu.json keeps the figures.
# 3,000 steps of 20 images is ~1.2 epochs: expect ~100-110 nats, not the paper's 84.78.
# Carry ray/deepspeed/prefect/pyarrow wheels as for scripts/gpu_check.sh (".whl", see its header).
set -euo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-vae}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
DATA=shared/data/binarized-mnist/binarized_mnist.npz
[ -f "$DATA" ] || DATA=../shared/data/binarized-mnist/binarized_mnist.npz
[ -f "$DATA" ] || { echo "gpu_vae.sh: no binarized_mnist.npz under shared/data/binarized-mnist" >&2; exit 1; }
timeout 280 python3 -m flows.vae_density --preset gpu --use-gpu --num-workers 1 --steps 3000 \
  --data "$DATA" --likelihood bernoulli --out "$OUT/run" 2>&1 | tail -20
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
m = json.loads((out / "run" / "metrics.json").read_text())
keep = {k: m[k] for k in ("nll_nats", "nll_k", "elbo_nats", "iwae_nats", "stderr_nats", "mc_stderr_nats",
                          "bits_per_dim", "n_test", "train_wall_s", "eval_wall_s", "eval_device", "accelerator")}
keep["baselines"] = {k: b["nll_nats"] for k, b in m["baselines"].items()}
keep["train"] = {k: m["train"][k] for k in ("steps", "samples", "items_per_s", "best_val_step")}
keep["card"] = (out / "gpu.txt").read_text().splitlines()[-1]
json.dump(keep, open(out / "vae-gpu.json", "w"), indent=2)
print(json.dumps(keep, indent=2))
PY
