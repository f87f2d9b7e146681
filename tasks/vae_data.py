"""Density-estimation data for the VAE: any source -> one prepared ``prepared.npz`` + manifest.

Sources (``source``):

* an ``.npz`` with arrays ``train`` and ``test`` (and optionally ``valid``), each (N, ...) —
  trailing dims are flattened (e.g. the statically binarised MNIST of
  ``shared/data/binarized-mnist``, read in place);
* a ``.parquet`` file with a split column (``train`` / ``valid`` / ``test``) and either one
  list column (one image per row) or several numeric columns (one per pixel);
* nothing: scikit-learn's bundled handwritten digits (1,797 images of 8x8, grey levels 0..16,
  so ``likelihood="categorical"`` with 17 levels), split by a seeded permutation.

Without a ``valid`` split, a seeded ``valid_fraction`` slice of train becomes it (and leaves
train). Values are checked against the likelihood's support (bernoulli: 0/1; categorical:
integers 0..n_levels-1; gaussian: finite) with an error naming the file, the array or column
and the fix. The output directory holds ``prepared.npz`` (train, valid, test) and its
``manifest.json`` (likelihood, n_levels, x_dim, rows, input hash), written last.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.storage import IncompleteOutput, atomic_path, read_manifest, reusable, sha256_file, write_manifest

SCHEMA_VERSION = 1
PREPARED = "prepared.npz"
SPLITS = ("train", "valid", "test")
LIKELIHOODS = ("bernoulli", "categorical", "gaussian")


@dataclass
class VAEData:
    train: np.ndarray     # (N, D)
    valid: np.ndarray
    test: np.ndarray
    likelihood: str
    n_levels: int         # 2 for bernoulli; 0 for gaussian
    manifest: dict

    @property
    def x_dim(self) -> int:
        return int(self.train.shape[1])


# ------------------------------------------------------------------ reading sources
def _flatten(name: str, where: str, a: np.ndarray) -> np.ndarray:
    if a.ndim < 2:
        raise ValueError(f"{where}: array {name!r} has shape {a.shape}; expected (N, D) or (N, H, W) "
                         f"with one example per row. Fix: reshape it to (n_examples, n_pixels).")
    if a.shape[0] == 0:
        raise ValueError(f"{where}: split {name!r} is empty; it needs at least one example.")
    return a.reshape(a.shape[0], -1)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        z = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{path}: cannot read without pickle ({e}). Fix: save plain numeric arrays "
                         f"with numpy.savez.") from None
    with z:
        names = set(z.files)
        missing = [s for s in ("train", "test") if s not in names]
        if missing:
            raise ValueError(f"{path}: no array(s) {missing} (has {sorted(names)}). Fix: save the splits "
                             f"as numpy.savez(path, train=..., test=..., valid=...) (valid optional).")
        return {s: _flatten(s, str(path), z[s]) for s in SPLITS if s in names}


def _read_parquet(path: Path, split_column: str) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq
    table = pq.read_table(path)
    if split_column not in table.column_names:
        raise ValueError(f"{path}: no split column {split_column!r} (columns: {table.column_names[:10]}). "
                         f"Fix: add a column with values train/valid/test, or pass split_column=.")
    split = np.asarray(table.column(split_column).to_pylist(), dtype=object)
    unknown = sorted(set(split.tolist()) - set(SPLITS))
    if unknown:
        raise ValueError(f"{path}: column {split_column!r} has values {unknown[:5]} besides {SPLITS}. "
                         f"Fix: label every row train, valid or test.")
    feats = [c for c in table.column_names if c != split_column]
    if not feats:
        raise ValueError(f"{path}: no data columns besides {split_column!r}.")
    if len(feats) == 1 and str(table.schema.field(feats[0]).type).startswith(("list", "large_list", "fixed_size_list")):
        rows = table.column(feats[0]).to_pylist()
        if len({len(r) for r in rows}) > 1:
            raise ValueError(f"{path}: list column {feats[0]!r} has rows of different lengths; every "
                             f"example needs the same number of pixels.")
        x = np.asarray(rows, dtype=np.float64)
    else:
        bad = [c for c in feats if not str(table.schema.field(c).type).startswith(("int", "uint", "float", "double", "bool"))]
        if bad:
            raise ValueError(f"{path}: column(s) {bad[:5]} are not numeric. Fix: keep only pixel columns "
                             f"and {split_column!r}, or one list column.")
        x = np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in feats], axis=1).astype(np.float64)
    out = {s: x[split == s] for s in SPLITS if (split == s).any()}
    missing = [s for s in ("train", "test") if s not in out]
    if missing:
        raise ValueError(f"{path}: no rows with {split_column} in {missing}. Fix: label the held-out rows "
                         f"'test' and the rest 'train' (valid optional).")
    return {s: _flatten(s, str(path), a) for s, a in out.items()}


def load_digits_splits(seed: int, test_fraction: float) -> dict[str, np.ndarray]:
    """scikit-learn's 8x8 digits (values 0..16), a seeded train/test split."""
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError:
        raise ValueError("no source given and scikit-learn is not installed: install it "
                         "(pip install -c constraints.txt scikit-learn) or pass an .npz/.parquet source") from None
    x = load_digits().data.astype(np.uint8)                                      # (1797, 64)
    perm = np.random.default_rng([seed, 1]).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    return {"train": x[perm[n_test:]], "test": x[perm[:n_test]]}


# ------------------------------------------------------------------ checks
def check_support(a: np.ndarray, likelihood: str, n_levels: int, where: str) -> None:
    """Raise ValueError naming ``where`` when values lie outside the likelihood's support."""
    if not np.isfinite(a).all():
        raise ValueError(f"{where}: {int((~np.isfinite(a)).sum())} NaN/inf values. Fix: drop or impute them.")
    if likelihood == "gaussian":
        return
    if not (a == np.round(a)).all():
        i = np.flatnonzero(a != np.round(a))[0]
        raise ValueError(f"{where}: value {a.flat[i]!r} at flat index {i} is not an integer, but the "
                         f"{likelihood} likelihood needs levels 0..{n_levels - 1}. Fix: use "
                         f"likelihood='gaussian', or quantise/binarise the data (binarize=threshold).")
    lo, hi = a.min(), a.max()
    if lo < 0 or hi > n_levels - 1:
        fix = ("binarise it (binarize=threshold) or use likelihood='categorical'" if likelihood == "bernoulli"
               else f"pass n_levels >= {int(hi) + 1}, or shift the values to start at 0")
        raise ValueError(f"{where}: values span {lo:g}..{hi:g}, outside 0..{n_levels - 1} of the "
                         f"{likelihood} likelihood. Fix: {fix}.")


def _finish(splits: dict[str, np.ndarray], likelihood: str, n_levels: int | None, binarize: float | None,
            where: str) -> tuple[dict[str, np.ndarray], int]:
    """Binarise, check support and shapes, pick dtypes; returns (splits, n_levels)."""
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood={likelihood!r}: choose one of {LIKELIHOODS}")
    if binarize is not None:
        splits = {s: (a >= binarize).astype(np.uint8) for s, a in splits.items()}
    dims = {s: a.shape[1] for s, a in splits.items()}
    if len(set(dims.values())) > 1:
        raise ValueError(f"{where}: the splits have different numbers of pixels {dims}. Fix: every "
                         f"split needs the same (flattened) shape.")
    if likelihood == "bernoulli":
        n_levels = 2
    elif likelihood == "categorical" and n_levels is None:
        n_levels = int(max(np.nanmax(a) for a in splits.values())) + 1
    elif likelihood == "gaussian":
        n_levels = 0
    if likelihood == "categorical" and n_levels < 2:
        raise ValueError(f"{where}: n_levels={n_levels}; a categorical likelihood needs at least 2 levels.")
    for s, a in splits.items():
        check_support(a, likelihood, n_levels, f"{where} [{s}]")
    dtype = np.float32 if likelihood == "gaussian" else (np.uint8 if n_levels <= 256 else np.int32)
    return {s: a.astype(dtype) for s, a in splits.items()}, n_levels


# ------------------------------------------------------------------ prepare / load
def prepare_vae_data(out_dir: str | Path, source: str | Path | None = None, likelihood: str | None = None,
                     n_levels: int | None = None, binarize: float | None = None, valid_fraction: float = 0.1,
                     test_fraction: float = 0.2, split_column: str = "split", seed: int = 0) -> dict:
    """Write ``out_dir/prepared.npz`` (train, valid, test) and its manifest; returns the manifest.
    A complete output of the same inputs and options is reused."""
    out_dir = Path(out_dir)
    if likelihood is None:
        likelihood = "categorical" if source is None else "bernoulli"
    if not 0 < valid_fraction < 1 or not 0 < test_fraction < 1:
        raise ValueError(f"valid_fraction={valid_fraction}, test_fraction={test_fraction}: each must be in (0, 1)")
    if source is None:
        where = "sklearn.datasets.load_digits"
        splits = load_digits_splits(seed, test_fraction)
        src_sha = hashlib.sha256(b"".join(splits[s].tobytes() for s in ("train", "test"))).hexdigest()
    else:
        src = Path(source)
        if not src.is_file():
            raise ValueError(f"{src}: no such file. Fix: pass an existing .npz or .parquet, or no source for "
                             f"scikit-learn's digits.")
        if src.suffix not in (".npz", ".parquet"):
            raise ValueError(f"{src}: unsupported file type {src.suffix!r}; use .npz or .parquet.")
        where, src_sha = str(src), sha256_file(src)
    options = {"likelihood": likelihood, "n_levels": n_levels, "binarize": binarize, "seed": seed,
               "valid_fraction": valid_fraction, "test_fraction": test_fraction, "split_column": split_column}
    key = hashlib.sha256(json.dumps({"source_sha256": src_sha, **options}, sort_keys=True).encode()).hexdigest()
    if (m := reusable(out_dir, schema_version=SCHEMA_VERSION, inputs_sha256=key)) is not None:
        return m
    if source is not None:
        splits = _read_npz(src) if src.suffix == ".npz" else _read_parquet(src, split_column)
    valid_from = "file" if "valid" in splits else "train-slice"
    if valid_from == "train-slice":
        splits["train"], splits["valid"] = _slice_valid(splits["train"], valid_fraction, seed, where)
    splits, n_levels = _finish(splits, likelihood, n_levels, binarize, where)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)  # incomplete until rewritten
    buf = io.BytesIO()
    np.savez(buf, **{s: splits[s] for s in SPLITS})
    with atomic_path(out_dir / PREPARED) as tmp:
        tmp.write_bytes(buf.getvalue())
    rows = {s: int(splits[s].shape[0]) for s in SPLITS}
    return write_manifest(out_dir, {PREPARED: {"rows": rows}}, schema_version=SCHEMA_VERSION,
                          inputs_sha256=key, source=where, source_sha256=src_sha, likelihood=likelihood,
                          n_levels=n_levels, x_dim=int(splits["train"].shape[1]), valid_from=valid_from,
                          **{k: v for k, v in options.items() if k not in ("likelihood", "n_levels")})


def _slice_valid(train: np.ndarray, fraction: float, seed: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng([seed, 2]).permutation(len(train))
    n_valid = int(round(fraction * len(train)))
    if n_valid < 1 or n_valid >= len(train):
        raise ValueError(f"{where}: train has {len(train)} rows; valid_fraction={fraction} leaves no "
                         f"validation or no training rows. Fix: add a 'valid' split or change valid_fraction.")
    return train[np.sort(perm[n_valid:])], train[np.sort(perm[:n_valid])]


def load_vae_data(path: str | Path) -> VAEData:
    """A prepared directory (or its ``prepared.npz``), checked against its manifest."""
    p = Path(path)
    d = p.parent if p.name == PREPARED else p
    try:
        manifest = read_manifest(d)
    except IncompleteOutput as e:
        raise ValueError(f"{d}: not a prepared VAE dataset ({e}). Fix: run "
                         f"tasks.vae_data.prepare_vae_data(out_dir, source) and pass out_dir.") from None
    if manifest.get("schema_version") != SCHEMA_VERSION or PREPARED not in manifest["files"]:
        raise ValueError(f"{d}: manifest is not a VAE dataset of schema {SCHEMA_VERSION}. Fix: re-run "
                         f"tasks.vae_data.prepare_vae_data into a fresh directory.")
    with np.load(d / PREPARED, allow_pickle=False) as z:
        arrays = {s: z[s] for s in SPLITS}
    return VAEData(**arrays, likelihood=manifest["likelihood"], n_levels=int(manifest["n_levels"]),
                   manifest=manifest)
