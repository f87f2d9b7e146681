"""long-context-lm's parameters: the preset table and one pydantic config (flows/long_context_lm.py)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flows._cli import InputFile, check_attention_options
from models.attention_pattern import PATTERNS, layer_kinds
from tasks.kgclue_data import DataQualityError

MULTIPLES = (1, 2, 4, 8, 16)   # evaluation lengths, in units of the training length N
CORPUS_SEED = 0                # the train/validation split of documents (not --seed: same text for every run)
Kind = Literal["softmax", "alibi", "hwfa", "vq", "performer"]
assert set(Kind.__args__) == set(PATTERNS), "Kind must list models.attention_pattern.PATTERNS"

# One table: model size, training schedule, evaluation budget and the options of the vq/performer kinds.
PRESETS: dict[str, dict[str, Any]] = {
    # N = 64, 0.82M parameters. Measured (models/lm.py fwd+bwd+AdamW, 1 thread per worker as the
    # trainer runs it, on this 2-core box while other jobs ran): 0.12-0.18 s per step of 16 rows,
    # i.e. 5.6k-8.3k tokens/s per worker, so 300 steps of 2 x 16 rows (0.6M tokens) train in
    # ~1 min per kind, plus ~30 s of Ray/DeepSpeed start; the 5 lengths x 64k tokens evaluate in
    # seconds (performer at 16N = 1024 is the slowest: ~2 s per window).
    "tiny": dict(train_len=64, d_model=128, n_head=4, n_layer=4, d_ff=512, steps=300, micro_batch=16,
                 lr=2e-3, warmup=30, eval_tokens=65_536,
                 options={"vq": {"codebook_size": 64, "block_len": 32, "qk_norm": True, "prev_block": True}, "performer": {"nb_features": 64}}),
    # N = 128, 2.7M parameters, 6 layers (HWFA: 5 window layers of w = 20, then full NoPE log-n).
    # Sized so every kind trains in <= ~8 wall-min (<= ~16 CPU-min: 2 workers x 1 thread) on a
    # 2-core box, so all five kinds fit one sitting: 600 steps of 2 x 8 rows of 128 (1.2M
    # tokens, < 0.05 epoch of the stdlib train split). Measured on an Intel Xeon (AVX-512 + AMX,
    # fp32), quiet box: training 223-240 s for softmax/alibi/hwfa, ~330 s for vq/performer
    # (3.9k-6.1k tokens/s), evaluation 17-72 s per kind; all five kinds 25.6 wall-min.
    # vq: block_len 32, so at N = 128 half the context comes through the code cache (the explicit
    # window is two blocks); with block_len >= N/2 training would never use the codes. rel_key
    # (query-dependent relative keys in the window) and dead_fraction 0.01 took vq from 3.025 to
    # 2.563 bits per byte at N (softmax + RoPE 2.221), training 446 s on an AMD EPYC; RoPE in the
    # window (window_rope) in place of the ALiBi-initialised scalar bias (rel_bias off) to 2.366
    # (671 s on an AMD EPYC with AVX2 only; bench/results/long-context-base-vq-window-rope.json);
    # a learned per-head query temperature (q_temp, 1.5 at init) and score on the codes
    # (code_bias) to 2.311 / 2.342 over seeds 0 / 1 (was 2.366 / 2.447; softmax 2.221 / 2.240),
    # 610-644 s (bench/results/long-context-base-vq-preset-qtemp15*.json).
    "base": dict(train_len=128, d_model=192, n_head=4, n_layer=6, d_ff=768, steps=600, micro_batch=8,
                 lr=1.5e-3, warmup=50, eval_tokens=65_536,
                 options={"vq": {"codebook_size": 128, "block_len": 32, "qk_norm": True, "prev_block": True,
                                 "rel_key": True, "dead_fraction": 0.01, "window_rope": True, "rel_bias": False,
                                 "q_temp": 1.5, "code_bias": True},
                          "performer": {"nb_features": 128}}),
}


class LMCorpusError(DataQualityError):
    """The corpus cannot be used (unreadable, or too little validation text for 16N); the message
    names it and the fix. A DataQualityError, so the CLI prints it as one line (exit 1)."""


class LongContextConfig(BaseModel):
    """The flow's parameters; fields left None take the preset's value (:meth:`preset_values`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    preset: Literal["tiny", "base"] = "tiny"
    attention: Kind = Field("hwfa", description="the attention kind trained (models/attention_pattern.PATTERNS)")
    compare: tuple[Kind, ...] = Field((), description="train and evaluate each of these kinds (overrides attention)")
    out: Path = Path("runs/long-context-lm")
    corpus: InputFile = Field(None, description="a UTF-8 text file or a Parquet file; None: the stdlib .py files")
    column: str = Field("text", min_length=1, description="the Parquet file's text column")
    steps: int | None = Field(None, ge=1, le=10_000_000, description="override the preset's training steps")
    eval_tokens: int | None = Field(None, ge=1, le=100_000_000,
                                    description="predicted tokens per length (rounded to a multiple of 16N)")
    ray_address: str | None = Field(None, description="Ray cluster address; None: local Ray (or RAY_ADDRESS)")
    num_workers: int = Field(2, ge=1, le=1024)
    seed: int = Field(0, ge=0, le=2**31 - 1, description="training seed (the corpus split is fixed)")
    attention_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per kind, options laid over the preset's, e.g. {'vq': {'exact_window': true}}")
    max_failures: int = Field(2, ge=0, le=100)

    @field_validator("compare", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        """'softmax,hwfa' (the CLI, a deployment) -> ('softmax', 'hwfa')."""
        if isinstance(v, str):
            return tuple(s.strip() for s in v.split(",") if s.strip())
        return () if v is None else v

    @field_validator("ray_address")
    @classmethod
    def _ray_answers(cls, v: str | None) -> str | None:
        from flows.kgclue_config import check_ray_address
        return check_ray_address(v)

    @model_validator(mode="after")
    def _check(self) -> "LongContextConfig":
        dup = sorted({k for k in self.compare if self.compare.count(k) > 1})
        if dup:
            raise ValueError(f"compare lists {dup} more than once; give each kind of {PATTERNS} at most once")
        if self.compare and "attention" in self.model_fields_set and self.attention not in self.compare:
            raise ValueError(f"attention={self.attention!r} is not one of compare={list(self.compare)}; "
                             f"omit --attention with --compare, or add it to the list")
        if (self.ray_address is None and not os.environ.get("RAY_ADDRESS")
                and self.num_workers > (os.cpu_count() or 1)):
            raise ValueError(f"num_workers={self.num_workers} but a local Ray has {os.cpu_count()} CPU(s): the "
                             f"training would wait for CPUs forever; lower --num-workers or give --ray-address")
        p = PRESETS[self.preset]
        layer_kinds(self.attention, p["n_layer"], p["train_len"])  # the pattern builds (n_layer >= 2 for hwfa)
        stray = sorted(set(self.attention_options) - set(self.kinds()))
        if stray:
            raise ValueError(f"attention_options name {stray}, which this run does not train ({list(self.kinds())}); "
                             f"key the options by a trained kind, e.g. {{\"vq\": {{\"exact_window\": true}}}}")
        for kind in self.attention_options:  # unknown or bad options fail here, not in a training worker
            layers = layer_kinds(kind, p["n_layer"], p["train_len"], None, {kind: self.kind_options(kind)})
            own = [opts for k, opts in layers if k == kind]
            if not own:  # e.g. hwfa: its layers are window and full_nope_logn, options keyed hwfa reach none
                raise ValueError(f"attention_options for {kind!r} would reach no layer: the {kind!r} pattern builds "
                                 f"{sorted({k for k, _ in layers})} layers; only a kind that names its own layers "
                                 "takes options")
            check_attention_options(kind, own[0])
        return self

    def kind_options(self, kind: str) -> dict[str, Any]:
        """The preset's options for ``kind`` with this run's ``attention_options`` laid over them."""
        return {**PRESETS[self.preset]["options"].get(kind, {}), **self.attention_options.get(kind, {})}

    def kinds(self) -> tuple[str, ...]:
        return self.compare or (self.attention,)

    def preset_values(self) -> dict[str, Any]:
        p = dict(PRESETS[self.preset])
        for name in ("steps", "eval_tokens"):
            if getattr(self, name) is not None:
                p[name] = getattr(self, name)
        return p

    def lengths(self) -> list[tuple[int, int]]:
        n = PRESETS[self.preset]["train_len"]
        return [(m, m * n) for m in MULTIPLES]
