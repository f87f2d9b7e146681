"""A generated KgCLUE-format sample, for running the pipeline where the real files are absent.

Deterministic per seed. Questions follow a handful of templates around (subject, predicate),
some subjects carry a （disambiguation）, and dev/test use partly unseen predicates, like the
real relation-disjoint splits. It is a smoke-test dataset, not a benchmark.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tasks.storage import atomic_write_text

_CHARS = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处理"
_PREDICATES = ["出生地", "职业", "国籍", "作者", "出版社", "出生日期", "毕业院校", "代表作品", "主讲课程",
               "主要成就", "所属地区", "面积", "人口", "创始人", "成立时间", "总部地点", "类型", "导演",
               "主演", "首播时间", "英文名", "别名", "身高", "体重", "民族", "所属公司", "发行时间",
               "专辑", "作曲", "作词", "学校", "外文名", "中文名", "简称", "主要奖项", "上映时间"]
_TEMPLATES = ["{s}的{p}是什么？", "你知道{s}的{p}吗？", "{s}的{p}是哪个？", "请问{s}的{p}是谁？",
              "{s}{p}是什么", "谁知道{s}的{p}？"]


def _name(rng: np.random.Generator, lo: int, hi: int) -> str:
    return "".join(_CHARS[i] for i in rng.integers(0, len(_CHARS), rng.integers(lo, hi + 1)))


def write_sample(out_dir: str | Path, n_train: int = 800, n_dev: int = 120, n_test: int = 120,
                 seed: int = 0) -> Path:
    """Write train/dev/test.json (KgCLUE format) into ``out_dir``; returns it."""
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    n_seen = int(len(_PREDICATES) * 0.7)
    seen_preds, unseen_preds = _PREDICATES[:n_seen], _PREDICATES[n_seen:]

    def row(i: int, preds: list[str], labelled: bool) -> dict:
        s = _name(rng, 2, 5)
        m = _name(rng, 2, 6) if rng.random() < 0.3 else ""
        p = preds[int(rng.integers(len(preds)))]
        o = _name(rng, 1, 6)
        q = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))].format(s=s, p=p)
        r = {"id": i, "question": q}
        if labelled:
            r["answer"] = f"{s}（{m}） ||| {p} ||| {o}" if m else f"{s} ||| {p} ||| {o}"
        return r

    splits = {"train": [row(i, seen_preds, True) for i in range(n_train)],
              "dev": [row(i, seen_preds[: n_seen // 2] + unseen_preds, True) for i in range(n_dev)],
              "test": [row(i, unseen_preds, False) for i in range(n_test)]}
    for name, rows in splits.items():
        atomic_write_text(out_dir / f"{name}.json",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return out_dir


def prepare_training_set(root: str | Path, data_dir: str | Path | None = None, n_train: int = 400,
                         n_dev: int = 40, n_test: int = 10, k: int = 6, seed: int = 0) -> tuple[Path, Path]:
    """Data + mini-KB + vocabulary under ``root`` (KgCLUE files when given, else a sample).

    The quickest complete input for a training run (tests, benchmarks, smoke checks); returns
    (prepared data directory, vocabulary directory).
    """
    from tasks.kb import ingest_kb
    from tasks.kgclue_data import discover, prepare, read_split
    from tasks.minikb import MiniKbConfig, build_triples, gold_triples, write_kb_txt
    from tasks.vocab import build_vocab
    root = Path(root)
    files = discover(Path(data_dir) if data_dir else write_sample(root / "sample", n_train, n_dev, n_test,
                                                                      seed=seed))
    prepare(files, root / "data")
    rows = read_split(files["train"], "train").rows
    write_kb_txt(build_triples(gold_triples(rows), MiniKbConfig("mini", k=k)), root / "kb.txt")
    ingest_kb(root / "kb.txt", root / "kb")
    build_vocab([r["question"] for r in rows], root / "kb", root / "vocab", "prepare_training_set")
    return root / "data", root / "vocab"
