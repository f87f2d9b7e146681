"""Trainer adapter of the VAE / IWAE density model (models/vae.py) on tasks/vae_data.py output.

Data: ``spec.data_dir`` (preferred: its manifest's hashes enter the run name) or
``spec.data["path"]``: a directory written by ``tasks.vae_data.prepare_vae_data`` (or its
``prepared.npz``). ``spec.model`` holds VAEConfig fields; x_dim, likelihood and n_levels
come from the data's manifest (a value given in the spec must agree). Options in
``spec.data``: ``val_k`` (importance samples of the validation bound; default the model's M),
``val_rows`` (cap on validation rows, default all).
"""
from __future__ import annotations

from pathlib import Path

KINDS = ("vae",)
DATA_OPTIONS = {"path", "val_k", "val_rows", "likelihood"}


def _data_path(spec) -> str:
    return spec.data_dir or spec.data.get("path", "")


def check_spec(spec) -> None:
    from models.vae import VAEConfig
    if not _data_path(spec):
        raise ValueError("task vae needs data_dir (or data={'path': ...}): a directory made by "
                         "tasks.vae_data.prepare_vae_data")
    unknown = sorted(set(spec.data) - DATA_OPTIONS)
    if unknown:
        raise ValueError(f"task vae: unknown data option(s) {unknown}; known: {sorted(DATA_OPTIONS)}")
    if "likelihood" in spec.data and "likelihood" in spec.model and spec.data["likelihood"] != spec.model["likelihood"]:
        raise ValueError(f"task vae: data likelihood {spec.data['likelihood']!r} differs from model "
                         f"likelihood {spec.model['likelihood']!r}")
    VAEConfig.from_dict({**spec.model})  # unknown or invalid fields fail here, on the driver
    if int(spec.data.get("val_k", 1)) < 1:
        raise ValueError(f"task vae: val_k={spec.data['val_k']} must be >= 1")


def model_config(spec, data):
    """VAEConfig from the spec's fields and the data's shape and likelihood (they must agree)."""
    from models.vae import VAEConfig
    from_data = {"x_dim": data.x_dim, "likelihood": data.likelihood}
    if data.likelihood == "categorical":
        from_data["n_levels"] = data.n_levels
    for k, v in from_data.items():
        if k in spec.model and spec.model[k] != v:
            raise ValueError(f"task vae: model {k}={spec.model[k]!r} but the data "
                             f"({_data_path(spec)}) has {k}={v!r}; drop it from the spec or re-prepare the data")
    return VAEConfig.from_dict({**spec.model, **from_data})


def setup(spec, device, rank: int):
    import torch

    from models.vae import VAE, elbo, log_px
    from tasks.adapters import TaskSetup
    from tasks.vae_data import load_vae_data
    data = load_vae_data(_data_path(spec))
    cfg = model_config(spec, data)
    torch.manual_seed(spec.seed)  # identical initial weights on every rank
    model = VAE(cfg)
    dtype = torch.float32 if data.likelihood == "gaussian" else torch.uint8
    train = torch.as_tensor(data.train, dtype=dtype, device=device)
    valid = torch.as_tensor(data.valid[:int(spec.data.get("val_rows", len(data.valid)))], dtype=dtype)
    val_k = int(spec.data.get("val_k", cfg.samples))

    def batch(rows, step):
        x = train[torch.as_tensor(rows, dtype=torch.long, device=device)]
        return {"x": x.float() if data.likelihood != "categorical" else x.long()}, len(rows)

    def validate(m):
        """Negative ELBO (and IWAE_val_k bound) in nats on the validation split; the noise is
        fixed by spec.seed so successive validations compare the model, not the samples."""
        xv = valid.to(next(m.parameters()).device)
        xv = xv.float() if data.likelihood != "categorical" else xv.long()
        e, _ = elbo(m, xv, K=1, seed=spec.seed)
        out = {"val_elbo": float(-e.mean())}
        if val_k > 1:
            b, _ = log_px(m, xv, K=val_k, seed=spec.seed)
            out["val_iwae"] = float(-b.mean())
        out["val_loss"] = out.get("val_iwae", out["val_elbo"])
        return out
    return TaskSetup(model=model, n_rows=len(train), make_batch=batch, validate=validate)


def load_model(cfg: dict):
    from models.vae import VAE, VAEConfig
    return VAE(VAEConfig.from_dict(cfg))


def model_dir_of(path: str | Path) -> Path:  # noqa: D401 - kept for symmetry with other adapters
    return Path(path)
