"""Ray Train + DeepSpeed on CPU: 2 workers, loss goes down; a failed worker resumes from its checkpoint."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from models.seq2seq import PRESETS
from tasks.sample import prepare_training_set
from tasks.train import TrainSpec, load_trained_model, train

SMALL = dict(PRESETS["tiny"], d_model=64, d_ff=128, n_head=4, n_layer_enc=1, n_layer_dec=1)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainrun")
    prepare_training_set(root, n_train=400, n_dev=40, n_test=10, k=2)
    return root


def _spec(root, **kw) -> TrainSpec:
    base = dict(data_dir=str(root / "data"), vocab_dir=str(root / "vocab"), model=SMALL, steps=30,
                micro_batch=16, lr=3e-3, warmup=5, zero_stage=1, num_workers=2, checkpoint_every=10)
    return TrainSpec(**{**base, **kw})


def _weights(ckpt_dir):
    return load_trained_model(ckpt_dir).state_dict()


def test_two_workers_loss_goes_down_and_resume_after_failure_is_exact(ray_local, prepared, tmp_path):
    spec = _spec(prepared)
    latest: list[dict] = []
    # one progress call per poll (the newest item); a poll longer than the run: the last item only
    plain = train(spec, str(tmp_path / "plain"), on_progress=latest.append, poll_s=60.0)
    losses = [h["loss"] for h in plain.history]
    assert [h["step"] for h in plain.history] == [5, 10, 15, 20, 25, 30]
    assert latest and latest[-1] == plain.history[-1] and len(latest) < len(plain.history), latest
    assert losses[-1] < losses[0] - 0.5, losses
    assert plain.tokens_per_s > 0

    marker = tmp_path / "failed-once"
    every: list[dict] = []
    crashed = train(replace(spec, fail_at_step=15, fail_marker=str(marker)), str(tmp_path / "crash"), max_failures=1,
                    on_progress=every.append, progress="every")
    assert marker.exists(), "the injected failure happened"
    # progress="every": each pushed item, in order, and the restart's resume point (checkpoint 10)
    assert [e for e in every if "event" not in e] == crashed.history
    assert [e for e in every if "event" in e] == [{"event": "resume", "step": 10}]
    steps = [h["step"] for h in crashed.history]
    # attempt 1 reports 5, 10, 15 and dies at step 15; attempt 2 resumes from checkpoint 10, not 0
    assert steps == [5, 10, 15, 15, 20, 25, 30], steps
    a, b = _weights(plain.checkpoint_dir), _weights(crashed.checkpoint_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after resume")
    assert crashed.history[-1]["loss"] == pytest.approx(plain.history[-1]["loss"], abs=0)


def test_same_config_same_run_name_and_rerun_resumes_from_storage(ray_local, prepared, tmp_path):
    spec = _spec(prepared, seed=1)
    assert spec.run_name() == _spec(prepared, seed=1).run_name()
    assert spec.run_name() != _spec(prepared, seed=2).run_name()
    assert spec.run_name() == replace(spec, fail_at_step=3, fail_marker="x").run_name()
    first = train(replace(spec, steps=20), str(tmp_path))
    assert [h["step"] for h in first.history][-1] == 20
    # a re-run of the same run (a Prefect retry after the driver died) finds its last checkpoint
    # (step 20) and trains no step again: nothing is reported, the same checkpoint comes back
    again = train(replace(spec, steps=20), str(tmp_path))
    assert again.history == [], again.history
    a, b = _weights(first.checkpoint_dir), _weights(again.checkpoint_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_name_is_the_inputs_content_not_their_paths(prepared, tmp_path):
    """The same data under another path is the same run; other data (or another vocabulary)
    under the same path is another run."""
    import shutil
    spec = _spec(prepared)
    copy = tmp_path / "copy"
    shutil.copytree(prepared / "data", copy / "data")
    shutil.copytree(prepared / "vocab", copy / "vocab")
    moved = replace(spec, data_dir=str(copy / "data"), vocab_dir=str(copy / "vocab"))
    assert moved.run_name() == spec.run_name()
    other = tmp_path / "other"
    prepare_training_set(other, n_train=400, n_dev=40, n_test=10, k=2, seed=5)
    shutil.rmtree(copy / "data")
    shutil.copytree(other / "data", copy / "data")  # same path, other content
    assert replace(spec, data_dir=str(copy / "data"), vocab_dir=str(copy / "vocab")).run_name() != spec.run_name()


def test_accelerator_and_backend_follow_use_gpu(prepared):
    cpu = _spec(prepared)
    gpu = replace(cpu, use_gpu=True, bf16=True, zero_stage=2)
    assert cpu.accelerator() == ("cpu", "gloo") and gpu.accelerator() == ("cuda", "nccl")
    assert gpu.ds_config()["bf16"]["enabled"] and not cpu.ds_config()["bf16"]["enabled"]
    assert gpu.ds_config()["zero_optimization"]["stage"] == 2
    assert gpu.run_name() != cpu.run_name()


def test_make_optimizer_is_adamw_with_the_specs_settings():
    """The trainer's optimizer (fused AdamW) takes the spec's lr and weight decay and makes the
    same updates as torch's reference AdamW loop, weight decay included."""
    from tasks.train import make_optimizer
    spec = TrainSpec(data_dir="d", vocab_dir="v", lr=3e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(300, generator=g)), torch.nn.Parameter(torch.randn(7, 5, generator=g))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt = make_optimizer(a, spec)
    ref = torch.optim.AdamW(b, lr=3e-3, weight_decay=0.1, foreach=False)
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["fused"]) == (3e-3, 0.1, True)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in a]
        for p, q, gr in zip(a, b, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt.step()
        ref.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    assert not torch.equal(a[0].detach(), torch.randn(300, generator=torch.Generator().manual_seed(0)))


def test_validation_keeps_the_best_model_and_stops_early(ray_local, prepared, tmp_path):
    """A validation pass every 5 steps on the held-out relations: an absurd learning rate makes
    the validation loss worse after the first pass, so patience 2 stops the run at step 15, and
    the exported model is the best one (its own validation loss is the minimum seen)."""
    from tasks.adapters import adapter
    spec = _spec(prepared, steps=60, lr=3.0, warmup=1, val_every=5, patience=2, checkpoint_every=100,
                 data={"holdout": {"frac": 0.2, "seed": 0}})
    res = train(spec, str(tmp_path))
    vals = [v["val_loss"] for v in res.validations]
    assert 2 <= len(vals) < 12 and res.steps < 60, (res.steps, vals)
    best = load_trained_model(res.checkpoint_dir)
    setup = adapter("seq2seq").setup(spec, torch.device("cpu"), 0)
    with torch.no_grad():
        own = setup.validate(best)["val_loss"]
    assert own == pytest.approx(min(vals), rel=1e-5), (own, vals)


def test_warm_start_loads_the_start_model_and_its_content_names_the_run(ray_local, prepared, tmp_path):
    from tasks.storage import write_manifest
    first = train(_spec(prepared, steps=10, checkpoint_every=10), str(tmp_path / "a"))
    start = tmp_path / "start-model"
    start.mkdir()
    for f in ("model.pt", "model_config.json"):
        (start / f).write_bytes((Path(first.checkpoint_dir) / f).read_bytes())
    write_manifest(start, ["model.pt", "model_config.json"])
    warm = _spec(prepared, steps=2, lr=0.0, warmup=1, checkpoint_every=2, warm_start=str(start))
    assert warm.run_name() != replace(warm, warm_start="").run_name()
    res = train(warm, str(tmp_path / "b"))
    a, b = _weights(first.checkpoint_dir), _weights(res.checkpoint_dir)
    assert all(torch.equal(a[k], b[k]) for k in a), "lr 0 from the warm start keeps its weights"
    name = warm.run_name()
    sd = torch.load(start / "model.pt", weights_only=True)
    k = next(iter(sd))
    sd[k] = sd[k] + 1.0
    torch.save(sd, start / "model.pt")
    write_manifest(start, ["model.pt", "model_config.json"])
    assert warm.run_name() != name, "another start model is another run"


def test_ranker_trains_under_ray_deepspeed_with_bf16_autocast(ray_local, prepared, tmp_path):
    from models.ranker import Ranker, RankerConfig
    model = {k: v for k, v in RankerConfig(vocab_size=5, d_model=32, n_head=2, n_layer=1, d_ff=64).to_dict().items()
             if k != "vocab_size"}
    spec = TrainSpec(data_dir=str(prepared / "data"), vocab_dir=str(prepared / "vocab"), model=model, steps=60,
                     micro_batch=8, lr=1e-2, warmup=5, num_workers=2, checkpoint_every=20, task="ranker",
                     data={"group": 4}, cpu_bf16=True)
    assert spec.run_name().startswith("ranker-") and spec.run_name() != replace(spec, data={"group": 6}).run_name()
    seq = _spec(prepared)
    assert seq.run_name().startswith("seq2seq-") and seq.run_name() != replace(seq, cpu_bf16=True).run_name()
    with pytest.raises(ValueError, match="task"):
        replace(seq, task="classifier")
    res = train(spec, str(tmp_path))
    losses = [h["loss"] for h in res.history]
    assert [h["step"] for h in res.history][-1] == 60
    assert losses[-1] < losses[0] - 0.3 and losses[0] > 1.2, losses  # from ~ln 4 (chance) down
    ranker = load_trained_model(res.checkpoint_dir)
    assert isinstance(ranker, Ranker) and not ranker.training


def test_a_data_option_naming_a_directory_enters_the_run_name_by_content(tmp_path):
    """A corpus (or any input directory with a manifest) named in ``data`` is identity by its
    content: moved, the same run; rewritten, another run."""
    import shutil
    from tasks.lm_corpus import prepare_corpus
    src = tmp_path / "text.txt"
    src.write_text("".join(f"line {i} of some text\n" for i in range(2000)), "utf-8")
    a = tmp_path / "a"
    prepare_corpus(a, str(src), val_fraction=0.3, lines_per_doc=50)
    spec = TrainSpec(task="lm", model={"d_model": 32, "n_head": 2, "n_layer": 1, "d_ff": 64},
                     data={"corpus": str(a), "seq_len": 16})
    shutil.copytree(a, tmp_path / "b")
    assert replace(spec, data={"corpus": str(tmp_path / "b"), "seq_len": 16}).run_name() == spec.run_name()
    src.write_text("".join(f"other {i} words here\n" for i in range(2000)), "utf-8")
    c = tmp_path / "c"
    prepare_corpus(c, str(src), val_fraction=0.3, lines_per_doc=50)
    assert replace(spec, data={"corpus": str(c), "seq_len": 16}).run_name() != spec.run_name()


def test_a_time_budget_stops_the_run_inside_it_at_the_bottom_of_its_schedule(ray_local, prepared, tmp_path):
    """max_train_s: the ranks re-plan the step count as they go (tasks/train_budget.py), so a run
    capped at 100,000 steps stops inside its 8-second loop budget, with the LR schedule decayed to
    the planned count and both replicas identical; a failure at step 60 resumes from checkpoint 50
    with the plan and the loop seconds spent before it (they count against the budget)."""
    budget = 8.0
    spec = _spec(prepared, steps=100_000, max_train_s=budget, checkpoint_every=50, fail_at_step=60,
                 fail_marker=str(tmp_path / "failed-once"))
    events: list[dict] = []
    res = train(spec, str(tmp_path / "run"), max_failures=1, on_progress=events.append, progress="every")
    assert (tmp_path / "failed-once").exists(), "the injected failure happened"
    assert {"event": "resume", "step": 50} in events
    assert 60 < res.steps < 100_000, res.steps
    last = res.history[-1]
    assert last["step"] == res.steps == last["steps"], last  # the final progress item is the plan's end
    assert last["lr"] < 0.1 * spec.lr, last  # decayed to the planned count, not to 100,000 steps
    assert len(res.replica_sha256) == 2 and len(set(res.replica_sha256)) == 1, res.replica_sha256
    # both attempts' loop seconds, minus the steps lost after checkpoint 50: inside the budget
    assert 0.5 * budget <= res.loop_s <= budget + 2.0, res.loop_s
    with pytest.raises(ValueError, match="max_train_s"):
        _spec(prepared, max_train_s=-1.0)
