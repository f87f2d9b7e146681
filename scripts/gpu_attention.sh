#!/usr/bin/env bash
# Attention-core benchmark on a CUDA card (prepared for a session lent a device machine; NOT RUN
# by the session that wrote it). Within ~5 minutes on one H100/H200 it measures forward+backward,
# causal, batch 1, 8 heads, head dim 64, bf16, T = 1k .. 64k, for torch SDPA (is_causal=True,
# flash kernel), Transformer-VQ (S=512, block_len 512; vq with the two-block window, vq1 with
# one block), Performer (m=256) and the sliding window (w=128), each point in a fresh process
# (see bench/attention.py). Needs only torch (the device image has it). On CUDA the vq kernel
# runs every (head, block) slice in one batch (no CPU tiling) and recomputes the probabilities
# in the backward once the scores pass _KEEP_CELLS.
# Writes $OUT/gpu-attention.json and $OUT/gpu-attention.png ($OUT defaults to /tmp/gpu-attention).
set -euo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-attention}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout 280 python3 -m bench.attention --device cuda --dtype bfloat16 --threads 4 --repeat 5 \
  --lengths 1024,2048,4096,8192,16384,32768,65536 --impls sdpa,vq,vq1,performer,window \
  --point-timeout 60 --json "$OUT/gpu-attention.json" --plot "$OUT/gpu-attention.png"
