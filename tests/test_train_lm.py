"""Task ``lm`` under Ray Train + DeepSpeed (2 CPU workers, ZeRO-1) for the kinds with state
outside the parameters: ``vq`` (EMA codebook, all-reduced statistics, dead-code restarts) and
``performer`` (scheduled feature redraws). Both ranks end with bitwise-identical models, the
state moved, and a run killed after a checkpoint resumes to the uninterrupted run's exact bytes
(the codebook and projection travel in the checkpoint)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from models.lm import LM, LMConfig
from tasks.lm_corpus import prepare_corpus
from tasks.train import TrainSpec, load_trained_model, train
from tests.conftest import stdlib_text

STEPS, CRASH_AT = 12, 7  # checkpoints at 4, 8, 12: the crash at 7 resumes from step 4
KINDS = {
    "vq": {"codebook_size": 16, "block_len": 8},
    "performer": {"nb_features": 16, "redraw_every": 5, "chunk_len": 8},
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~120 KB of real Python text in blocks of 200 lines (a few held out as validation)."""
    root = tmp_path_factory.mktemp("lmtrain")
    (root / "text.txt").write_text(stdlib_text(4_000), "utf-8")
    prepare_corpus(root / "corpus", str(root / "text.txt"), val_fraction=0.2)
    return root / "corpus"


def _spec(corpus: Path, kind: str) -> TrainSpec:
    model = {"d_model": 32, "n_head": 2, "n_layer": 2, "d_ff": 64, "train_len": 32, "pattern": kind,
             "attention_options": {kind: KINDS[kind]}}
    return TrainSpec(task="lm", data={"corpus": str(corpus), "seq_len": 32}, model=model, steps=STEPS,
                     micro_batch=4, lr=3e-3, warmup=2, zero_stage=1, num_workers=2, checkpoint_every=4)


def _state(ckpt_dir) -> dict[str, torch.Tensor]:
    return load_trained_model(ckpt_dir).state_dict()


@pytest.mark.parametrize("kind", list(KINDS))
def test_two_ranks_stay_identical_and_resume_is_bitwise(ray_local, corpus, tmp_path, kind):
    spec = _spec(corpus, kind)
    plain = train(spec, str(tmp_path / "plain"))
    assert len(plain.replica_sha256) == 2 and plain.replica_sha256[0] == plain.replica_sha256[1], \
        f"{kind}: the two ranks' models differ after training: {plain.replica_sha256}"
    a = _state(plain.checkpoint_dir)

    # the state outside the parameters moved (and was not simply left at its initial value)
    init = LM(LMConfig(**{**spec.model, "vocab_size": 256})).state_dict()
    moved = [k for k in a if (k.endswith(".codebook") or k.endswith(".proj")) and not torch.equal(a[k], init[k])]
    assert moved, f"{kind}: no codebook / projection changed in {STEPS} steps"

    marker = tmp_path / "failed-once"
    crashed = train(replace(spec, fail_at_step=CRASH_AT, fail_marker=str(marker)), str(tmp_path / "crash"),
                    max_failures=1)
    assert marker.exists(), "the injected failure happened"
    b = _state(crashed.checkpoint_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{kind}: {k} differs after resume"
    assert crashed.replica_sha256 == plain.replica_sha256
