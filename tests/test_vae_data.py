"""VAE data preparation (npz / parquet / sklearn digits), its input errors, and the trainer adapter."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.vae_data import PREPARED, load_vae_data, prepare_vae_data

MNIST = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "binarized-mnist" / "binarized_mnist.npz"


def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def binary(n: int, d: int = 12, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, d)) < 0.3).astype(np.uint8)


def test_npz_without_valid_gets_a_seeded_slice_of_train(tmp_path: Path) -> None:
    src = write_npz(tmp_path / "d.npz", train=binary(100), test=binary(30, seed=1))
    m = prepare_vae_data(tmp_path / "out", src, likelihood="bernoulli", valid_fraction=0.2, seed=3)
    assert m["files"][PREPARED]["rows"] == {"train": 80, "valid": 20, "test": 30}
    assert m["valid_from"] == "train-slice" and m["x_dim"] == 12 and m["n_levels"] == 2
    data = load_vae_data(tmp_path / "out")
    together = sorted(map(tuple, np.concatenate([data.train, data.valid]).tolist()))
    assert together == sorted(map(tuple, binary(100).tolist()))   # a partition of train, nothing lost
    np.testing.assert_array_equal(data.test, binary(30, seed=1))
    again = prepare_vae_data(tmp_path / "out2", src, likelihood="bernoulli", valid_fraction=0.2, seed=3)
    np.testing.assert_array_equal(load_vae_data(tmp_path / "out2").valid, data.valid)
    other = prepare_vae_data(tmp_path / "out3", src, likelihood="bernoulli", valid_fraction=0.2, seed=4)
    assert other["files"][PREPARED]["sha256"] != again["files"][PREPARED]["sha256"]


def test_reuse_and_a_valid_split_in_the_file(tmp_path: Path) -> None:
    imgs = binary(40, d=16).reshape(40, 4, 4)                 # images: flattened to 16 pixels
    src = write_npz(tmp_path / "d.npz", train=imgs, valid=imgs[:5], test=imgs[:7])
    m = prepare_vae_data(tmp_path / "out", src)
    assert m["valid_from"] == "file" and m["x_dim"] == 16
    t0 = os.stat(tmp_path / "out" / PREPARED).st_mtime_ns
    assert prepare_vae_data(tmp_path / "out", src) == m      # same inputs: reused, not rewritten
    assert os.stat(tmp_path / "out" / PREPARED).st_mtime_ns == t0
    m2 = prepare_vae_data(tmp_path / "out", src, likelihood="categorical", n_levels=3)
    assert m2["likelihood"] == "categorical" and m2["n_levels"] == 3


def test_parquet_with_split_column(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    x = np.random.default_rng(0).integers(0, 5, (30, 4))
    split = ["train"] * 20 + ["valid"] * 4 + ["test"] * 6
    pq.write_table(pa.table({**{f"p{i}": x[:, i] for i in range(4)}, "split": split}), tmp_path / "a.parquet")
    m = prepare_vae_data(tmp_path / "o1", tmp_path / "a.parquet", likelihood="categorical")
    assert m["n_levels"] == int(x.max()) + 1 and m["files"][PREPARED]["rows"] == {"train": 20, "valid": 4, "test": 6}
    np.testing.assert_array_equal(load_vae_data(tmp_path / "o1").test, x[24:])
    pq.write_table(pa.table({"x": [list(map(float, r)) for r in x], "part": split}), tmp_path / "b.parquet")
    m = prepare_vae_data(tmp_path / "o2", tmp_path / "b.parquet", likelihood="gaussian", split_column="part")
    data = load_vae_data(tmp_path / "o2" / PREPARED)
    assert data.train.dtype == np.float32 and m["n_levels"] == 0
    np.testing.assert_array_equal(data.train, x[:20].astype(np.float32))


def test_sklearn_digits_default(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    m = prepare_vae_data(tmp_path / "digits")
    assert m["likelihood"] == "categorical" and m["n_levels"] == 17 and m["x_dim"] == 64
    assert sum(m["files"][PREPARED]["rows"].values()) == 1797
    b = prepare_vae_data(tmp_path / "digits-bin", likelihood="bernoulli", binarize=8)
    assert b["n_levels"] == 2 and load_vae_data(tmp_path / "digits-bin").train.max() == 1


@pytest.mark.skipif(not MNIST.is_file(), reason=f"{MNIST} not found")
def test_binarized_mnist_in_place(tmp_path: Path) -> None:
    m = prepare_vae_data(tmp_path / "mnist", MNIST)
    assert m["files"][PREPARED]["rows"] == {"train": 50000, "valid": 10000, "test": 10000}
    assert m["valid_from"] == "file" and m["x_dim"] == 784
    assert abs(float(load_vae_data(tmp_path / "mnist").train.mean()) - 0.1306) < 5e-4


@pytest.mark.parametrize("arrays,kwargs,match", [
    ({"train": binary(10)}, {}, r"no array\(s\) \['test'\].*numpy.savez"),
    ({"train": np.zeros(10), "test": binary(3)}, {}, r"'train' has shape \(10,\).*reshape"),
    ({"train": binary(10) * 3, "test": binary(3)}, {}, r"\[train\].*0\.\.3, outside 0\.\.1.*binarise"),
    ({"train": binary(10) + 0.5, "test": binary(3)}, {"likelihood": "categorical"}, r"not an integer.*gaussian"),
    ({"train": binary(10) * 9, "test": binary(3)}, {"likelihood": "categorical", "n_levels": 5}, r"n_levels >= 10"),
    ({"train": binary(10, d=5), "test": binary(3, d=6)}, {}, r"different numbers of pixels"),
    ({"train": np.full((10, 2), np.nan), "test": binary(3, d=2)}, {"likelihood": "gaussian"}, r"NaN"),
    ({"train": binary(1), "test": binary(3)}, {}, r"valid_fraction"),
])
def test_bad_npz_inputs_name_file_array_and_fix(tmp_path: Path, arrays, kwargs, match) -> None:
    src = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match) as e:
        prepare_vae_data(tmp_path / "out", src, **kwargs)
    assert "bad.npz" in str(e.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_bad_parquet_and_paths(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"a": [0, 1], "b": [1, 0]}), tmp_path / "nosplit.parquet")
    with pytest.raises(ValueError, match=r"nosplit.parquet: no split column 'split'"):
        prepare_vae_data(tmp_path / "o", tmp_path / "nosplit.parquet")
    pq.write_table(pa.table({"a": [0, 1], "split": ["train", "train"]}), tmp_path / "notest.parquet")
    with pytest.raises(ValueError, match=r"notest.parquet: no rows with split in \['test'\]"):
        prepare_vae_data(tmp_path / "o", tmp_path / "notest.parquet")
    pq.write_table(pa.table({"a": [0, 1], "split": ["train", "dev"]}), tmp_path / "dev.parquet")
    with pytest.raises(ValueError, match=r"'dev'"):
        prepare_vae_data(tmp_path / "o", tmp_path / "dev.parquet")
    with pytest.raises(ValueError, match="no such file"):
        prepare_vae_data(tmp_path / "o", tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="prepare_vae_data"):
        load_vae_data(tmp_path)


# ---------------------------------------------------------------- trainer adapter
def make_spec(data_dir: Path | str, **kw):
    from tasks.train import TrainSpec
    return TrainSpec(task="vae", data_dir=str(data_dir) if data_dir else "", model={"z_dim": 3, "hidden": [16], "samples": 2, **kw.pop("model", {})},
                     steps=5, micro_batch=8, **kw)


def test_adapter_setup_train_step_validate_and_reload(tmp_path: Path) -> None:
    from tasks.adapters import adapter_for_kind
    from tasks.adapters.vae import load_model, setup
    src = write_npz(tmp_path / "d.npz", train=binary(60), test=binary(10))
    prepare_vae_data(tmp_path / "prep", src)
    spec = make_spec(tmp_path / "prep", data={"val_k": 4})
    s = setup(spec, torch.device("cpu"), 0)
    assert s.n_rows == 54 and s.model.cfg.x_dim == 12 and s.model.cfg.likelihood == "bernoulli"
    batch, n = s.make_batch(np.arange(8), 0)
    assert n == 8 and batch["x"].shape == (8, 12)
    loss, parts = s.model.loss(batch)
    loss.backward()
    v1, v2 = s.validate(s.model), s.validate(s.model)
    assert v1 == v2 and v1["val_loss"] == v1["val_iwae"] <= v1["val_elbo"] + 1e-6   # fixed noise
    cfg = s.model.cfg.to_dict()
    assert cfg["kind"] == "vae" and adapter_for_kind("vae").load_model is load_model
    m = load_model(cfg)
    m.load_state_dict(s.model.state_dict())
    assert m.loss(batch)[0].shape == ()


def test_adapter_spec_errors(tmp_path: Path) -> None:
    from tasks.adapters.vae import setup
    src = write_npz(tmp_path / "d.npz", train=binary(60), test=binary(10))
    prepare_vae_data(tmp_path / "prep", src)
    with pytest.raises(ValueError, match="needs data_dir"):
        make_spec("")
    with pytest.raises(ValueError, match="unknown field"):
        make_spec(tmp_path / "prep", model={"zdim": 3})
    with pytest.raises(ValueError, match="unknown data option"):
        make_spec(tmp_path / "prep", data={"vak_k": 3})
    spec = make_spec(tmp_path / "prep", model={"x_dim": 99})
    with pytest.raises(ValueError, match=r"x_dim=99 but the data .* has x_dim=12"):
        setup(spec, torch.device("cpu"), 0)
