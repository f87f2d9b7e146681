"""What this machine's CPU can do, so precision is chosen by capability, never assumed.

bf16 autocast on a CPU is fast only where the CPU has native bf16 (AVX512-BF16 or AMX);
elsewhere (AVX2 only, most laptops) PyTorch emulates it and training runs ~20x slower.
"""
from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def cpu_info() -> dict:
    """Model name and the flags that matter for matmul speed, from /proc/cpuinfo and torch."""
    import torch
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    native = native_cpu_bf16()
    return {
        "model": model,
        "cores": torch.get_num_threads(),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native,
    }


@lru_cache(maxsize=1)
def native_cpu_bf16() -> bool:
    """True when bf16 matmuls run natively (AVX512-BF16 or AMX tiles), per torch's own checks."""
    import torch
    checks = [getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None)]
    return any(bool(c()) for c in checks if c is not None)


def cpu_label() -> str:
    """One line naming the CPU and its matmul features, for reports and timings."""
    i = cpu_info()
    feats = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if i[f]]
    return f"{i['model']} ({', '.join(feats) or 'no AVX2'}; bf16 {'native' if i['native_bf16'] else 'emulated'})"


def choose_cpu_bf16(requested: str = "auto") -> bool:
    """bf16 autocast on CPU workers: ``auto`` = only where native; ``on``/``off`` force it."""
    if requested not in ("auto", "on", "off"):
        raise ValueError(f"cpu precision {requested!r}: choose auto, on or off")
    return native_cpu_bf16() if requested == "auto" else requested == "on"
