"""kgclue-pipeline's parameters: one preset table and one pydantic config (flows/kgclue.py)."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flows._cli import DataDir, InputFile, check_attention_options

# One table per flow: the model size (models/seq2seq.PRESETS), the generator's training, the
# re-ranker's training, the validation slice, and the placement defaults of each preset.
PRESETS = {
    #        model size, steps, micro batch/worker, lr, warmup, dev questions evaluated (None: all),
    #        re-ranker: steps, groups of candidates per worker and step, lr, ensemble size (seeds),
    #        validation slice questions scored per choice (None: all), ZeRO stage, GPU required,
    #        density stage: the question-encoding VAE's step cap (early stopping on its validation split)
    "tiny": dict(multitask_steps=100, model="tiny", steps=600, micro_batch=32, lr=2e-3, warmup=30, eval_limit=None, test_limit=None,
                 ranker_steps=300, ranker_micro_batch=16, ranker_lr=1e-3, rankers=1, val_limit=300,
                 zero_stage=1, gpu=False, density_steps=6000),
    "base": dict(multitask_steps=300, model="base", steps=1200, micro_batch=32, lr=1e-3, warmup=100, eval_limit=None, test_limit=None,
                 ranker_steps=3000, ranker_micro_batch=16, ranker_lr=1e-3, rankers=3, val_limit=None,
                 zero_stage=1, gpu=False, density_steps=12000),
    # The 104M model of models/seq2seq.PRESETS["gpu"] on GPU workers: bf16 + NCCL + ZeRO-2.
    "gpu": dict(multitask_steps=500, model="gpu", steps=3000, micro_batch=128, lr=5e-4, warmup=200, eval_limit=None, test_limit=None,
                ranker_steps=3000, ranker_micro_batch=64, ranker_lr=5e-4, rankers=3, val_limit=None,
                zero_stage=2, gpu=True, density_steps=12000),
}
METRIC_KEYS = ("score", "em_s", "em_p", "em_o", "em_all", "f1_s", "f1_p", "f1_o", "f1_all", "n_eval")
RAY_CONNECT_TIMEOUT_S = 0.5


class KgcluePipelineConfig(BaseModel):
    """Parameters of kgclue-pipeline (and of its train-seq2seq stage flow)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    preset: Literal["tiny", "base", "gpu"] = "tiny"
    out: Path = Path("runs/kgclue")
    data_dir: DataDir = Field(None, description="KgCLUE datasets/ folder; None: a generated sample")
    kb: InputFile = Field(None, description="official-format KB; None: the mini-KB protocol")
    kb_protocol: Literal["mini", "hard"] = "mini"
    eval_file: InputFile = Field(None, description="a labelled KgCLUE-format file to score (default: dev)")
    from_run: Path | None = Field(None, description="evaluate this earlier run's model; no training")
    ray_address: str | None = Field(None, description="Ray cluster address; None: local Ray (or RAY_ADDRESS)")
    num_workers: int = Field(2, ge=1, le=1024)
    zero_stage: int | None = Field(None, ge=0, le=3, description="DeepSpeed ZeRO stage (default: the preset's)")
    use_gpu: bool = False
    attention: Literal["softmax", "vq", "performer"] = Field(
        "softmax", description="self-attention kind of the generator's encoder and decoder")
    attention_options: dict[str, Any] = Field(default_factory=dict, description=(
        "options of that kind (models/attention_vq.py, models/attention_performer.py), e.g. "
        "{\"rel_key\": true} for vq; they enter the model's spec, so the run name"))
    cpu_precision: Literal["auto", "on", "off"] = Field(
        "auto", description="bf16 autocast for the re-ranker on CPU workers: auto = only where the CPU "
                            "has native bf16 (AVX512-BF16/AMX); elsewhere fp32")
    val_frac: float = Field(0.1, ge=0.0, lt=0.5, description=(
        "fraction of train's relations held out as the validation slice (0: none; every choice "
        "then falls back to the preset's defaults)"))
    steps: int | None = Field(None, ge=1, description="override the preset's training steps")
    micro_batch: int | None = Field(None, ge=1, le=4096)
    global_batch: int | None = Field(None, ge=1, le=1 << 20, description=(
        "rows per optimizer step over all workers; must divide by num_workers, and sets "
        "micro_batch = global_batch / num_workers"))
    beam: int = Field(4, ge=1, le=64)
    lookahead: bool = Field(True, description="re-weight the beam by question coverage (ALGORITHMS.md §3)")
    lookahead_rule: Literal["choose", "ours", "reference"] = Field(
        "choose", description="the look-ahead's LCS convention: 'reference' = over [CLS] Q [SEP] and the prefix's "
                              "[SEP]s as the reference code; 'ours' = characters only; 'choose' = the better of the "
                              "two on the validation slice")
    rerank: bool = Field(True, description="train the candidate re-ranker and re-rank the beam's subjects' keys")
    ranker_steps: int | None = Field(None, ge=1, description="override the preset's re-ranker training steps")
    rankers: int | None = Field(None, ge=1, le=8, description="override the preset's re-ranker ensemble size")
    multitask: Literal["primary_aux", "primary_aux_published", "pcgrad", "gradcosine", "weighted_sum"] | None = Field(
        None, description="the finetune-multitask stage: fine-tune the trained generator with auxiliary tasks "
                          "(subject tagging, look-alike predicate matching) combined by this rule (ZeRO-0); the "
                          "better of fine-tuned and original on the validation slice goes to evaluation")
    density: bool = Field(False, description="the density stage: a VAE on the encoder's question encodings, "
                                             "log q(x) per question, AUROC vs corrupted questions")
    density_steps: int | None = Field(None, ge=1, description="override the preset's cap on the density VAE's "
                                                              "training steps (it stops early on its validation split)")
    seed: int = 0
    max_failures: int = Field(2, ge=0, le=100)

    @field_validator("from_run")
    @classmethod
    def _run(cls, v: Path | None) -> Path | None:
        if v is not None and not (v / "model" / "manifest.json").is_file():
            raise ValueError(f"{v}: not a finished kgclue-pipeline run (no model/manifest.json)")
        return v

    @model_validator(mode="after")
    def _attention_options(self) -> "KgcluePipelineConfig":
        """Options are checked by building the kind once at a toy size, so a typo is refused
        before Ray starts, in the kind's own words."""
        if not self.attention_options:
            return self
        if self.attention == "softmax":
            raise ValueError(f"attention_options {self.attention_options} given, but attention 'softmax' takes "
                             "none; add --attention vq|performer")
        check_attention_options(self.attention, self.attention_options)
        return self

    @field_validator("ray_address")
    @classmethod
    def _ray_answers(cls, v: str | None) -> str | None:
        return check_ray_address(v)

    @model_validator(mode="after")
    def _batches(self) -> "KgcluePipelineConfig":
        if self.global_batch is None:
            return self
        if self.global_batch % self.num_workers:
            raise ValueError(f"global_batch={self.global_batch} is not divisible by num_workers="
                             f"{self.num_workers}; choose global_batch as a multiple of num_workers "
                             f"(micro_batch = global_batch / num_workers per worker)")
        per_worker = self.global_batch // self.num_workers
        if self.micro_batch is not None and self.micro_batch != per_worker:
            raise ValueError(f"micro_batch={self.micro_batch} contradicts global_batch={self.global_batch} / "
                             f"num_workers={self.num_workers} = {per_worker}; give one of micro_batch, "
                             f"global_batch")
        if per_worker > 4096:
            raise ValueError(f"global_batch={self.global_batch} / num_workers={self.num_workers} = {per_worker} "
                             f"rows per worker, over the micro_batch limit 4096")
        return self

    @model_validator(mode="after")
    def _cluster(self) -> "KgcluePipelineConfig":
        if PRESETS[self.preset]["gpu"] and not self.use_gpu and not self.from_run:
            raise ValueError(f"preset {self.preset!r} trains on GPU workers: add --use-gpu (and --ray-address of a "
                             f"GPU cluster when this machine has no GPU)")
        if self.use_gpu and self.ray_address is None:
            import torch
            if not torch.cuda.is_available():
                raise ValueError("use_gpu=True but no GPU here and no ray_address of a GPU cluster")
        if (self.ray_address is None and not os.environ.get("RAY_ADDRESS") and not self.use_gpu
                and not self.from_run and self.num_workers > (os.cpu_count() or 1)):
            raise ValueError(f"num_workers={self.num_workers} but a local Ray has {os.cpu_count()} CPU(s): "
                             f"the training would wait for CPUs forever; lower num_workers or give "
                             f"ray_address of a cluster")
        return self

    def preset_values(self) -> dict:
        p = dict(PRESETS[self.preset])
        for name in ("steps", "ranker_steps", "rankers", "micro_batch", "zero_stage", "density_steps"):
            if getattr(self, name) is not None:
                p[name] = getattr(self, name)
        if self.global_batch is not None:
            p["micro_batch"] = self.global_batch // self.num_workers
        return p

    def holdout(self) -> dict | None:
        """The validation slice's definition (tasks/validation.py), or None when off."""
        return {"frac": self.val_frac, "seed": self.seed} if self.val_frac > 0 else None


def ray_host_port(address: str) -> tuple[str, int]:
    """(host, port) of ``host:port`` or ``ray://host:port``; ValueError for anything else."""
    from urllib.parse import urlsplit
    a = address.strip()
    parts = urlsplit(a if "://" in a else f"//{a}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("", "ray") or not parts.hostname or port is None or port == 0:
        raise ValueError(f"{address!r}: give host:port (a Ray head's GCS, e.g. 10.0.0.5:6379), "
                         f"ray://host:port (Ray Client, e.g. ray://head:10001), or 'auto'")
    return parts.hostname, port


def check_ray_address(v: str | None) -> str | None:
    """Every flow config's ``ray_address`` validator: host:port or ray://host:port must accept a
    TCP connection within RAY_CONNECT_TIMEOUT_S (no Ray job starts before this passes); None,
    "auto" and "local" are resolved by Ray itself."""
    if v is None or v.strip() in ("auto", "local"):
        return v
    host, port = ray_host_port(v)
    try:
        socket.create_connection((host, port), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ValueError(
            f"{v!r}: nothing answers at {host}:{port} ({e.strerror or type(e).__name__} within "
            f"{RAY_CONNECT_TIMEOUT_S} s); start the cluster (infra/README.md), fix the address, or "
            f"omit ray_address (--ray-address) for a local Ray") from None
    return v
