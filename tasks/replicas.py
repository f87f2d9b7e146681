"""Data-parallel replicas must stay identical: one hash of a module's whole state, and every
rank's hash gathered in rank order (each training checkpoint reports them; tests assert equality)."""
from __future__ import annotations

import hashlib


def state_sha256(module) -> str:
    """One hash of a module's whole state (parameters and buffers: codebooks, projections), in
    key order, by exact bytes."""
    import torch
    h = hashlib.sha256()
    for k, t in module.state_dict().items():
        h.update(k.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def replica_hashes(module) -> list[str]:
    """Every rank's :func:`state_sha256`, in rank order (a collective: all ranks call it). Data
    parallelism promises identical replicas after each step; this is the check. ZeRO-3 shards the
    parameters, so there is no replica to hash: []."""
    import torch.distributed as dist
    if module is None:
        return []
    mine = state_sha256(module)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


# --------------------------------------------------------------------------- driver
