"""Named per-layer attention patterns: which registered kind (and options) each layer gets.

A pattern is only a list of ``(kind, options)`` for :func:`models.attention.make_attention`
— the same mechanism every model uses, no second one:

* ``softmax``: every layer full causal softmax attention with RoPE (the reference kind);
* ``alibi``: every layer full causal attention with ALiBi biases;
* ``hwfa``: L−1 ``window`` layers (RoPE, window w) then one ``full_nope_logn`` layer
  (ALGORITHMS.md §6); by default w is the largest with (w−1)(L−1)+1 ≤ ¾·N;
* ``vq``, ``performer``: every layer that kind (registered by models/attention_vq.py and
  models/attention_performer.py);
* an explicit list whose items are a kind name or ``(kind, options)``.

``options`` maps a kind name to that kind's own options (e.g. ``{"vq": {"codebook_size": 64}}``);
``window`` and ``full_nope_logn`` get ``window`` and ``train_len`` filled in when not given.
"""
from __future__ import annotations

from typing import Mapping, Sequence

PATTERNS = ("softmax", "alibi", "hwfa", "vq", "performer")

LayerSpec = tuple[str, dict]


def hwfa_default_window(n_layer: int, train_len: int) -> int:
    """The largest w with (w−1)(L−1)+1 ≤ ¾·N: the window layers' receptive field stays within
    three quarters of the training length (α ≤ 3/4 in the post)."""
    if n_layer < 2:
        raise ValueError(f"HWFA needs n_layer >= 2 (window layers + one full layer), got {n_layer}")
    if train_len < 2:
        raise ValueError(f"train_len must be >= 2, got {train_len}")
    # 4·((w−1)(L−1)+1) ≤ 3N, in integers
    return (3 * train_len - 4) // (4 * (n_layer - 1)) + 1


def receptive_field(window: int, n_window_layers: int) -> int:
    """Tokens one position of a stack of causal window layers depends on: (w−1)·L' + 1."""
    return (window - 1) * n_window_layers + 1


def layer_kinds(pattern: str | Sequence[str | tuple[str, Mapping]], n_layer: int, train_len: int,
                window: int | None = None, options: Mapping[str, Mapping] | None = None) -> list[LayerSpec]:
    """The (kind, options) of each of the ``n_layer`` layers under ``pattern``."""
    options = dict(options or {})
    if isinstance(pattern, str):
        kinds = _named(pattern, n_layer)
    else:
        kinds = [(p, {}) if isinstance(p, str) else (p[0], dict(p[1])) for p in pattern]
        if len(kinds) != n_layer:
            raise ValueError(f"pattern lists {len(kinds)} layers but n_layer is {n_layer}")
    if any(k == "window" for k, _ in kinds) and window is None:
        window = hwfa_default_window(n_layer, train_len)
    defaults = {"window": {"window": window}, "full_nope_logn": {"train_len": train_len}}
    return [(k, {**defaults.get(k, {}), **options.get(k, {}), **own}) for k, own in kinds]


def _named(pattern: str, n_layer: int) -> list[LayerSpec]:
    if pattern not in PATTERNS:
        raise ValueError(f"unknown attention pattern {pattern!r}; choose one of {PATTERNS} "
                         "or give an explicit list of kinds")
    if n_layer < 1:
        raise ValueError(f"n_layer must be >= 1, got {n_layer}")
    if pattern == "hwfa":
        if n_layer < 2:
            raise ValueError(f"HWFA needs n_layer >= 2 (window layers + one full layer), got {n_layer}")
        return [("window", {})] * (n_layer - 1) + [("full_nope_logn", {})]
    return [(pattern, {})] * n_layer
