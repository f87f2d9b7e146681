"""A trained model's directory: its files (``model.pt`` weights, ``model_config.json``), loading
it back (``weights_only=True``; the config's ``kind`` picks the adapter), warm-starting a new
model from it, and where a run keeps its re-rankers."""
from __future__ import annotations

import json
from pathlib import Path

MODEL_FILE, MODEL_CONFIG = "model.pt", "model_config.json"


def warm_start_weights(model, model_dir: str) -> None:
    """Load a trained model's weights into ``model`` (``weights_only``); the new model may
    have more parameters (new heads), but every loaded tensor must fit one of its own."""
    import torch
    sd = torch.load(Path(model_dir) / MODEL_FILE, map_location="cpu", weights_only=True)
    own = model.state_dict()
    bad = [k for k, v in sd.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise ValueError(f"warm start {model_dir}: {len(bad)} tensors do not fit the model "
                         f"(first: {bad[:3]}); the start model's config must match the spec's model")
    model.load_state_dict(sd, strict=False)


def ranker_dir(run_dir: str | Path, member: int) -> Path:
    """Where a run keeps re-ranker ``member`` of its ensemble (``ranker``, ``ranker-1``, ...)."""
    return Path(run_dir) / ("ranker" if member == 0 else f"ranker-{member}")


def trained_ranker_dirs(run_dir: str | Path) -> list[Path]:
    """The re-rankers a run has finished, in member order (stops at the first one missing)."""
    out: list[Path] = []
    while (ranker_dir(run_dir, len(out)) / "manifest.json").is_file():
        out.append(ranker_dir(run_dir, len(out)))
    return out


def load_trained_model(checkpoint_dir: str | Path):
    """The exported model of a checkpoint (``weights_only=True``), in eval mode; the model
    config's ``kind`` picks the adapter that rebuilds it (no kind: the KgCLUE seq2seq)."""
    import torch

    from tasks.adapters import adapter_for_kind
    d = Path(checkpoint_dir)
    raw = json.loads((d / MODEL_CONFIG).read_text())
    model = adapter_for_kind(raw.get("kind", "seq2seq")).load_model(raw)
    model.load_state_dict(torch.load(d / MODEL_FILE, map_location="cpu", weights_only=True))
    return model.eval()
