"""kgclue-pipeline: data prep -> KB -> vocabulary -> trie -> train -> evaluate -> report.

    python -m flows.kgclue --preset tiny|base --data-dir DIR --out DIR [--kb FILE]
                           [--eval-file FILE] [--from-run DIR] [--ray-address ADDR]

``tiny`` runs the whole DAG on a 2-core CPU in minutes (the README's main command); ``base``
is the real run on the full train split; ``gpu`` the 104M model on GPU workers (``--use-gpu``).
A validation slice (10% of train's relations, held out of training) makes the pipeline's
choices; dev is only reported. ``--from-run`` evaluates the model an earlier run
trained, against another ``--kb`` / ``--eval-file``, without training again. Every stage
caches by content: a re-run with the same inputs trains nothing again.
"""
from __future__ import annotations

import flows  # noqa: F401  (embedded defaults before prefect is imported)

import argparse
import json
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from prefect import flow, get_run_logger

from flows._cli import json_object, run_cli
from flows.kgclue_config import METRIC_KEYS, PRESETS, KgcluePipelineConfig, ray_host_port  # noqa: F401
from tasks import reporting
from tasks.minikb import MiniKbConfig
from tasks.steps import (build_kb, build_trie_step, build_vocab_step, evaluate_step, prepare_data,
                         train_step)
from tasks.storage import read_manifest, write_json_atomic
from tasks.train import ranker_dir, trained_ranker_dirs

def versions() -> dict[str, str]:
    """The stack this run used (for the report)."""
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "ray", "deepspeed", "prefect", "pyarrow", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    return out


def _data_stages(cfg: KgcluePipelineConfig, vocab_dir: str) -> dict:
    """prepare_data -> build_kb -> build_vocab (unless reusing a run's) -> build_trie."""
    from flows.data_prep import DataPrepConfig, input_files
    out = cfg.out
    files, kb_splits = input_files(DataPrepConfig(out=out, data_dir=cfg.data_dir, kb=cfg.kb,
                                                  kb_protocol=cfg.kb_protocol, seed=cfg.seed))
    if cfg.eval_file is not None:  # validated and prepared with the other splits (data/eval.parquet)
        files["eval"] = str(cfg.eval_file)
        if cfg.kb is None:  # the mini-KB holds every labelled answer: the eval file's too
            kb_splits = [*kb_splits, "eval"]
    data_m = prepare_data(files, str(out / "data"), 0.01)
    kb_m = build_kb(str(out / "data"), str(out), str(cfg.kb) if cfg.kb else None, kb_splits,
                    MiniKbConfig(cfg.kb_protocol, seed=cfg.seed), 64 << 20, 0.01)
    vocab_m = read_manifest(vocab_dir) if cfg.from_run else build_vocab_step(str(out / "data"), str(out / "kb"), vocab_dir)
    trie_m = build_trie_step(str(out / "kb"), vocab_dir, str(out / "trie"))
    return {"data": data_m, "kb": kb_m, "vocab": vocab_m, "trie": trie_m}


def _train_spec(cfg: KgcluePipelineConfig, vocab_dir: str) -> dict:
    """The generator's spec: its identity is the content of the data and vocabulary (their
    manifests' hashes, tasks.train.TrainSpec.run_name), never their paths."""
    from dataclasses import asdict

    from models.seq2seq import PRESETS as MODEL_PRESETS
    from tasks.train import TrainSpec
    p = cfg.preset_values()
    model = dict(MODEL_PRESETS[p["model"]])
    if cfg.attention != "softmax":
        model["attention"] = cfg.attention
    if cfg.attention_options:
        model["attention_options"] = {cfg.attention: dict(cfg.attention_options)}
    spec = TrainSpec(task="seq2seq", data_dir=str((cfg.out / "data").resolve()),
                     vocab_dir=str(Path(vocab_dir).resolve()), data={"holdout": cfg.holdout()},
                     model=model, steps=p["steps"], micro_batch=p["micro_batch"],
                     lr=p["lr"], warmup=p["warmup"], zero_stage=p["zero_stage"], num_workers=cfg.num_workers,
                     use_gpu=cfg.use_gpu, bf16=cfg.use_gpu, seed=cfg.seed,
                     checkpoint_every=max(20, p["steps"] // 10))
    return asdict(spec)


def _ranker_spec(cfg: KgcluePipelineConfig, vocab_dir: str, member: int = 0) -> dict:
    """The re-ranker's training spec; ensemble members differ only in their seed. bf16
    autocast on CPU only where the CPU computes bf16 natively (tasks/hw.py)."""
    from dataclasses import asdict

    from models.ranker import RankerConfig
    from tasks.hw import choose_cpu_bf16
    from tasks.train import TrainSpec
    p = cfg.preset_values()
    model = {k: v for k, v in RankerConfig(vocab_size=5).to_dict().items() if k != "vocab_size"}
    spec = TrainSpec(task="ranker", data_dir=str((cfg.out / "data").resolve()),
                     vocab_dir=str(Path(vocab_dir).resolve()), data={"group": 8, "holdout": cfg.holdout()},
                     model=model, steps=p["ranker_steps"], micro_batch=p["ranker_micro_batch"], lr=p["ranker_lr"],
                     warmup=min(100, max(1, p["ranker_steps"] // 10)), zero_stage=p["zero_stage"],
                     num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, bf16=cfg.use_gpu, seed=cfg.seed + member,
                     checkpoint_every=max(20, p["ranker_steps"] // 10),
                     cpu_bf16=(not cfg.use_gpu) and choose_cpu_bf16(cfg.cpu_precision))
    return asdict(spec)


def _eval_rows(cfg: KgcluePipelineConfig) -> tuple[str, list[dict]]:
    name = "dev" if cfg.eval_file is None else "eval"
    rows = pq.read_table(cfg.out / "data" / f"{name}.parquet").to_pylist()
    limit = cfg.preset_values()["eval_limit"]
    return name, rows[:limit] if limit else rows


def _val_rows(cfg: KgcluePipelineConfig) -> list[dict]:
    """The validation slice's questions (held out of every training), up to the preset's limit."""
    from tasks.validation import VAL, labelled_rows
    if cfg.holdout() is None:
        return []
    rows = labelled_rows(cfg.out / "data", [VAL], cfg.holdout())
    limit = cfg.preset_values()["val_limit"]
    return rows[:limit] if limit else rows


def choose_on_validation(cfg: KgcluePipelineConfig, model_dir: str, vocab_dir: str, ranker_dirs: list[str],
                         max_src_len: int) -> dict:
    """Every choice the pipeline makes, made on the validation slice (never on dev): first the
    look-ahead rule (``ours`` or ``reference``, beam search alone), then how many of the trained
    re-rankers to use (0 = the beam search alone). Returns the choices and every candidate's
    validation score."""
    rows = _val_rows(cfg)
    default_rule = "ours" if cfg.lookahead_rule == "choose" else cfg.lookahead_rule
    choice = {"lookahead": default_rule if cfg.lookahead else False, "rankers": len(ranker_dirs),
              "val_scores": {}, "lookahead_val_scores": {}, "val_n": len(rows)}
    if not rows:
        return {**choice, "why": "no validation slice (val_frac 0)"}
    val_dir = str(cfg.out / "eval" / "val")
    Path(val_dir).mkdir(parents=True, exist_ok=True)

    def val_score(name: str, lookahead, rankers: list[str]) -> float:
        return evaluate_step.with_options(name=f"validate-{name}")(
            model_dir, vocab_dir, str(cfg.out / "trie"), rows, val_dir, f"val_{name}", cfg.beam, lookahead,
            ranker_dirs=rankers or None, max_src_len=max_src_len)["score"]

    table = []
    if cfg.lookahead and cfg.lookahead_rule == "choose":
        rules = {r: val_score(f"lookahead-{r}", r, []) for r in ("ours", "reference")}
        choice["lookahead"] = max(rules, key=lambda r: (round(rules[r], 6), r == "ours"))  # ties: ours
        choice["lookahead_val_scores"] = rules
        table += [{"choice": "lookahead", "candidate": r, "val_score": v, "chosen": r == choice["lookahead"]}
                  for r, v in rules.items()]
    if ranker_dirs:
        scores: dict[int, float] = {}
        for k in range(len(ranker_dirs) + 1):
            if k == 0 and choice["lookahead_val_scores"]:
                scores[0] = choice["lookahead_val_scores"][choice["lookahead"]]  # the same evaluation
                continue
            scores[k] = val_score(f"rankers-{k}", choice["lookahead"], ranker_dirs[:k])
        choice["rankers"] = max(scores, key=lambda k: (round(scores[k], 6), k))  # ties: the larger ensemble
        choice["val_scores"] = {str(k): v for k, v in scores.items()}
        table += [{"choice": "rankers", "candidate": str(k), "val_score": v, "chosen": k == choice["rankers"]}
                  for k, v in scores.items()]
    if table:
        reporting.table("kgclue-validation-choice", table,
                        f"Choices made on {len(rows)} validation-slice questions (relation-disjoint, held out of "
                        f"training; dev is never used to choose)")
    return choice


def finetune_multitask(cfg: KgcluePipelineConfig, model_dir: str, vocab_dir: str, model_m: dict) -> tuple[str, dict]:
    """The finetune-multitask stage: warm-start from the trained generator, fine-tune with the
    auxiliary tasks under the chosen gradient rule (tasks/adapters/multitask.py; ZeRO-0, the
    stage where a combined direction really is applied), then keep whichever of (fine-tuned,
    original) scores better on the validation slice (beam alone). Returns (model dir, report)."""
    from dataclasses import asdict

    from tasks.evaluate import trained_max_src_len
    from tasks.train import TrainSpec
    p = cfg.preset_values()
    gen = dict((model_m.get("spec") or {}).get("model") or {})
    spec = TrainSpec(task="multitask", data_dir=str((cfg.out / "data").resolve()),
                     vocab_dir=str(Path(vocab_dir).resolve()), warm_start=str(Path(model_dir).resolve()),
                     data={"method": cfg.multitask, "aux": ["subject_tags", "predicate_match"],
                           "holdout": cfg.holdout()},
                     model=gen, steps=p["multitask_steps"], micro_batch=p["micro_batch"], lr=p["lr"] * 0.3,
                     warmup=10, zero_stage=0, num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, seed=cfg.seed,
                     checkpoint_every=max(20, p["multitask_steps"] // 5))
    tuned_dir = str(cfg.out / "model-multitask")
    tuned_m = train_step.with_options(name="finetune-multitask")(
        asdict(spec), str((cfg.out / "ray").resolve()), tuned_dir, cfg.ray_address, cfg.max_failures)
    rows = _val_rows(cfg)
    report = {"method": cfg.multitask, "run_name": tuned_m["run_name"], "steps": tuned_m["steps"], "chosen": "original"}
    if not rows:
        report["why"] = "no validation slice: the original generator is kept"
        return model_dir, report
    val_dir = str(cfg.out / "eval" / "val")
    Path(val_dir).mkdir(parents=True, exist_ok=True)
    scores = {}
    for name, d in (("original", model_dir), ("finetuned", tuned_dir)):
        scores[name] = evaluate_step.with_options(name=f"validate-{name}")(
            d, vocab_dir, str(cfg.out / "trie"), rows, val_dir, f"val_{name}", cfg.beam, cfg.lookahead,
            max_src_len=trained_max_src_len(d))["score"]
    report.update(val_scores=scores, chosen="finetuned" if scores["finetuned"] > scores["original"] else "original")
    reporting.table("kgclue-multitask-choice", [{"model": k, "val_score": v, "chosen": k == report["chosen"]}
                                                for k, v in scores.items()],
                    f"finetune-multitask ({cfg.multitask}) vs the original generator on {len(rows)} validation questions")
    return (tuned_dir if report["chosen"] == "finetuned" else model_dir), report


@flow(name="train-seq2seq", log_prints=True)
def train_seq2seq_flow(config: KgcluePipelineConfig) -> dict:
    """The data stages (cached) and the training stage alone, with a markdown report."""
    vocab_dir = str(config.out / "vocab")
    stages = _data_stages(config, vocab_dir)
    m = train_step(_train_spec(config, vocab_dir), str((config.out / "ray").resolve()),
                   str(config.out / "model"), config.ray_address, config.max_failures)
    reporting.markdown("train-seq2seq-report", "\n".join([
        f"# train-seq2seq — {config.preset}", "",
        f"run `{m['run_name']}`: {m['steps']} steps, final loss {m['final_loss']:.4f}, "
        f"{m['tokens_per_s']:,.0f} tokens/s, {m['train_wall_s']:.0f} s", "",
        f"attention `{config.attention}`, ZeRO {config.preset_values()['zero_stage']}, "
        f"accelerator {'cuda' if config.use_gpu else 'cpu'}, CPU {_cpu_label()}", "",
        f"data `{stages['data']['inputs_sha256'][:16]}…`, vocab `{stages['vocab']['vocab_sha256'][:16]}…`",
        "", "## Versions", reporting.md_table([versions()])]), "Training run, inputs and versions")
    return m


def _cpu_label() -> str:
    from tasks.hw import cpu_label
    return cpu_label()


@flow(name="kgclue-pipeline", log_prints=True)
def kgclue_pipeline(config: KgcluePipelineConfig) -> dict:
    """The main DAG; writes ``metrics.json`` under ``config.out`` and returns it."""
    from tasks.evaluate import trained_max_src_len
    logger = get_run_logger()
    t0 = time.perf_counter()
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    if config.from_run:
        vocab_dir, model_dir = str(config.from_run / "vocab"), str(config.from_run / "model")
        ranker_root = config.from_run
    else:
        vocab_dir, model_dir, ranker_root = str(out / "vocab"), str(out / "model"), out
    n_rankers = config.preset_values()["rankers"]
    if config.from_run and config.rankers is None:  # every re-ranker the earlier run trained
        n_rankers = len(trained_ranker_dirs(ranker_root))
    ranker_dirs = [str(ranker_dir(ranker_root, i)) for i in range(n_rankers)]
    stages = _data_stages(config, vocab_dir)
    if config.from_run:
        model_m = read_manifest(model_dir)
        logger.info("kgclue-pipeline: evaluating %s's model %s (no training)", config.from_run, model_m["run_name"])
    else:
        model_m = train_step(_train_spec(config, vocab_dir), str((out / "ray").resolve()), model_dir,
                             config.ray_address, config.max_failures)
    ranker_ms: list[dict] = []
    if config.rerank and not config.from_run:
        for i, d in enumerate(ranker_dirs):
            ranker_ms.append(train_step.with_options(name="train-ranker")(
                _ranker_spec(config, vocab_dir, i), str((out / "ray").resolve()), d, config.ray_address,
                config.max_failures))
    elif config.rerank:
        found = [d for d in ranker_dirs if (Path(d) / "manifest.json").is_file()]
        if not found:
            logger.warning("kgclue-pipeline: %s has no trained re-ranker; evaluating the beam search alone",
                           config.from_run)
        ranker_dirs = found
        ranker_ms = [read_manifest(d) for d in found]
    multitask = None
    if config.multitask and not config.from_run:
        model_dir, multitask = finetune_multitask(config, model_dir, vocab_dir, model_m)
    max_src_len = trained_max_src_len(model_dir)
    choice = choose_on_validation(config, model_dir, vocab_dir, ranker_dirs if ranker_ms else [], max_src_len)
    ranker_arg = ranker_dirs[:choice["rankers"]] if ranker_ms and choice["rankers"] else None
    name, rows = _eval_rows(config)
    eval_dir = str(out / "eval")
    Path(eval_dir).mkdir(parents=True, exist_ok=True)
    lookahead = choice["lookahead"]
    m_eval = evaluate_step(model_dir, vocab_dir, str(out / "trie"), rows, eval_dir, name, config.beam, lookahead,
                           ranker_dirs=ranker_arg, max_src_len=max_src_len)
    test_rows = []
    if config.kb is not None and (out / "data" / "test.parquet").is_file():
        test_rows = pq.read_table(out / "data" / "test.parquet").to_pylist()
        limit = config.preset_values()["test_limit"]
        test_rows = test_rows[:limit] if limit else test_rows
    elif (out / "data" / "test.parquet").is_file():
        logger.info("kgclue-pipeline: no leaderboard file: test has no answers, so under the %s mini-KB protocol "
                    "its subjects are not in the KB; give --kb (the official knowledge.txt) to predict test",
                    config.kb_protocol)
    if test_rows:
        evaluate_step(model_dir, vocab_dir, str(out / "trie"), test_rows, eval_dir, "kgclue", config.beam,
                      lookahead, ranker_dirs=ranker_arg, max_src_len=max_src_len)
    density = None
    if config.density:
        from flows.kgclue_density import density_stage
        density = density_stage(config, model_dir, vocab_dir, name, rows, max_src_len, config.ray_address,
                                config.max_failures)
    from tasks.hw import choose_cpu_bf16
    metrics = {k: m_eval[k] for k in METRIC_KEYS}
    metrics.update({
        "eval_set": name, "kb_protocol": "official" if config.kb else config.kb_protocol, "preset": config.preset,
        "attention": (model_m.get("spec") or {}).get("model", {}).get("attention", "softmax"),
        "attention_options": (model_m.get("spec") or {}).get("model", {}).get("attention_options", {}),
        "train_tokens_per_s": model_m.get("tokens_per_s"), "train_steps": model_m.get("steps"),
        "final_loss": model_m.get("final_loss"), "run_name": model_m.get("run_name"),
        "decode_questions_per_s": m_eval["questions_per_s"], "beam": config.beam, "lookahead": lookahead,
        "reranked": ranker_arg is not None, "rankers_used": len(ranker_arg or []),
        "ranker_run_names": [m.get("run_name") for m in ranker_ms],
        "ranker_train_wall_s": round(sum(m.get("train_wall_s") or 0 for m in ranker_ms), 1),
        "validation": choice, "leaderboard_file": bool(test_rows), "multitask": multitask,
        "density_auroc": {c["corruption"]: c["auroc"] for c in density["auroc"]} if density else None,
        "cpu": _cpu_label(), "ranker_cpu_bf16": (not config.use_gpu) and choose_cpu_bf16(config.cpu_precision),
        "accelerator": "cuda" if config.use_gpu else "cpu",
        "kb_triples": stages["kb"]["triples"], "trie_keys": stages["trie"]["keys"],
        "vocab_sha256": stages["vocab"]["vocab_sha256"], "wall_s": round(time.perf_counter() - t0, 1),
    })
    write_json_atomic(out / "metrics.json", metrics)
    reporting.table("kgclue-metrics", [{"metric": k, "value": v if isinstance(v, (int, float, str, bool)) else
                                        json.dumps(v, ensure_ascii=False)} for k, v in metrics.items()],
                    f"KgCLUE metrics on {name} ({metrics['kb_protocol']} KB)")
    cfg_rows = [{"parameter": k, "value": str(v)} for k, v in config.model_dump().items()]
    flat = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
    reporting.markdown("kgclue-report", "\n".join([
        f"# kgclue-pipeline — {config.preset}", "",
        f"**Score {metrics['score']:.2f}** (EM-O {metrics['em_o']:.2f}, F1-O {metrics['f1_o']:.2f}) on "
        f"{metrics['n_eval']} {name} questions, {metrics['kb_protocol']} KB"
        + (" (mini-KB protocol: not comparable to the leaderboard)" if not config.kb else ""), "",
        f"Attention `{metrics['attention']}`; re-rankers used: {metrics['rankers_used']} (chosen on "
        f"{choice['val_n']} validation-slice questions: {choice['val_scores'] or choice.get('why')}); "
        f"CPU {metrics['cpu']}, re-ranker bf16 autocast {'on' if metrics['ranker_cpu_bf16'] else 'off'}; "
        f"leaderboard file {'written' if test_rows else 'not written (needs --kb)'}", "",
        reporting.md_table([{k: (round(v, 3) if isinstance(v, float) else v) for k, v in flat.items()}]),
        "## Config", reporting.md_table(cfg_rows),
        "## Data", reporting.md_table([{"split": s, **{k: v for k, v in m.items() if k != "source"}}
                                       for s, m in stages["data"]["splits"].items()]),
        f"vocab sha256 `{stages['vocab']['vocab_sha256'][:16]}…`, KB source sha256 "
        f"`{stages['kb']['source_sha256'][:16]}…`, trie keys {stages['trie']['keys']:,}", "",
        "## Versions", reporting.md_table([versions()]),
    ]), "Metrics, config, data hashes and versions of this run")
    logger.info("kgclue-pipeline: %s", json.dumps(metrics, ensure_ascii=False))
    return metrics


def parse_args(argv: list[str] | None = None) -> KgcluePipelineConfig:
    ap = argparse.ArgumentParser(prog="python -m flows.kgclue", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--data-dir", type=Path, help="KgCLUE datasets/ folder (default: a generated sample)")
    ap.add_argument("--out", type=Path, default=Path("runs/kgclue"))
    ap.add_argument("--kb", type=Path, help="official-format KB (head\\trelation\\ttail)")
    ap.add_argument("--kb-protocol", choices=("mini", "hard"), default="mini")
    ap.add_argument("--eval-file", type=Path, help="labelled KgCLUE-format file to score (default: dev)")
    ap.add_argument("--from-run", type=Path, help="evaluate this earlier run's model, no training")
    ap.add_argument("--ray-address", help="Ray cluster address (default: local Ray, or RAY_ADDRESS)")
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--zero-stage", type=int, help="DeepSpeed ZeRO stage (default: the preset's; gpu: 2)")
    ap.add_argument("--use-gpu", action="store_true")
    ap.add_argument("--attention", choices=("softmax", "vq", "performer"), default="softmax",
                    help="self-attention kind of the generator")
    ap.add_argument("--attention-options", type=json_object, default={},
                    help='that kind\'s options as JSON, e.g. \'{"rel_key": true, "dead_fraction": 0.01}\' for vq')
    ap.add_argument("--cpu-precision", choices=("auto", "on", "off"), default="auto",
                    help="re-ranker bf16 autocast on CPU (auto: only with native bf16)")
    ap.add_argument("--val-frac", type=float, default=0.1,
                    help="fraction of train's relations held out as the validation slice (0: none)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--micro-batch", type=int, help="rows per worker per step (default: the preset's)")
    ap.add_argument("--global-batch", type=int, help="rows per step over all workers (sets --micro-batch)")
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--no-lookahead", action="store_true")
    ap.add_argument("--lookahead-rule", choices=("choose", "ours", "reference"), default="choose",
                    help="look-ahead LCS convention (choose: the better on the validation slice)")
    ap.add_argument("--no-rerank", action="store_true", help="skip the re-ranker (beam search alone)")
    ap.add_argument("--ranker-steps", type=int, help="re-ranker training steps (default: the preset's)")
    ap.add_argument("--rankers", type=int, help="re-ranker ensemble size (default: the preset's)")
    ap.add_argument("--multitask", choices=("primary_aux", "primary_aux_published", "pcgrad", "gradcosine",
                                            "weighted_sum"), help="add the finetune-multitask stage with this rule")
    ap.add_argument("--density", action="store_true",
                    help="add the density stage (VAE on question encodings, log q(x), AUROC vs corrupted)")
    ap.add_argument("--density-steps", type=int, help="cap on the density VAE's steps (default: the preset's; "
                                                      "it stops early on its validation split)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    return KgcluePipelineConfig(preset=a.preset, out=a.out, data_dir=a.data_dir, kb=a.kb, kb_protocol=a.kb_protocol,
                                eval_file=a.eval_file, from_run=a.from_run, ray_address=a.ray_address,
                                num_workers=a.num_workers, zero_stage=a.zero_stage, use_gpu=a.use_gpu,
                                attention=a.attention, attention_options=a.attention_options,
                                cpu_precision=a.cpu_precision, val_frac=a.val_frac,
                                steps=a.steps, micro_batch=a.micro_batch, global_batch=a.global_batch,
                                beam=a.beam, lookahead=not a.no_lookahead, lookahead_rule=a.lookahead_rule,
                                rerank=not a.no_rerank,
                                ranker_steps=a.ranker_steps, rankers=a.rankers, multitask=a.multitask, density=a.density,
                                density_steps=a.density_steps,
                                seed=a.seed)


def _stop_ray() -> None:
    import ray
    if ray.is_initialized():
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    return run_cli("kgclue-pipeline", parse_args, kgclue_pipeline, argv, lambda cfg, m: (
        f"kgclue-pipeline: Score {m['score']:.2f} (EM-O {m['em_o']:.2f}, F1-O {m['f1_o']:.2f}) on "
        f"{m['n_eval']} {m['eval_set']} questions; wrote {cfg.out / 'metrics.json'}"), cleanup=_stop_ray)


def main_train_seq2seq(argv: list[str] | None = None) -> int:
    """``trieflow run train-seq2seq ...``: the data stages and the generator's training alone
    (the same command line as kgclue-pipeline; evaluation options are ignored)."""
    return run_cli("train-seq2seq", parse_args, train_seq2seq_flow, argv, lambda cfg, m: (
        f"train-seq2seq: run {m['run_name']}, {m['steps']} steps, final loss {m['final_loss']:.4f}; "
        f"model in {cfg.out / 'model'}"), cleanup=_stop_ray)


if __name__ == "__main__":
    sys.exit(main())
