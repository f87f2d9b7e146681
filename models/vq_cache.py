"""Transformer-VQ's incremental decoding state (ALGORITHMS.md §8): per beam row, per-code sums
of the values before the explicit window and the window's keys (quantised, or exact with
``exact_window``) and values -- O(S·D + L·D)
per head whatever the length. :meth:`models.attention_vq.VQAttention._step` reads and extends it."""
from __future__ import annotations

import torch

from models.vq_codebook import code_sums


class VQCache:
    """Incremental state of one vq layer, one row per beam: per-code value sums and counts of
    the blocks before the explicit window (N, H, S, D) + (N, H, S), and the window's keys
    (quantised, or exact with ``exact_window``) and values: the previous block (with the two-block window) and the current one. O(S·D + L·D)
    per head, whatever the length."""

    def __init__(self) -> None:
        self.vsum: torch.Tensor | None = None  # (N, H, S, D)
        self.count: torch.Tensor | None = None  # (N, H, S)
        self.k: torch.Tensor | None = None  # (N, H, l, D) the current block's keys (quantised, or exact: exact_window)
        self.v: torch.Tensor | None = None  # (N, H, l, D)
        self.codes: torch.Tensor | None = None  # (N, H, l)
        self.k_prev: torch.Tensor | None = None  # (N, H, L, D) the previous block (two-block window)
        self.v_prev: torch.Tensor | None = None
        self.codes_prev: torch.Tensor | None = None
        self.length = 0

    def index_select(self, idx: torch.Tensor) -> "VQCache":
        """A cache whose row i is this cache's row idx[i]."""
        out = VQCache()
        out.length = self.length
        for name in ("vsum", "count", "k", "v", "codes", "k_prev", "v_prev", "codes_prev"):
            t = getattr(self, name)
            setattr(out, name, None if t is None else t.index_select(0, idx))
        return out

    def _add_to_sums(self, v: torch.Tensor, codes: torch.Tensor, n_code: int) -> None:
        N, H, l, D = v.shape
        vsum, count = code_sums(v, torch.ones(N, 1, l, dtype=v.dtype, device=v.device), codes, 1, n_code)
        vsum, count = vsum[:, :, 0], count[:, :, 0]
        self.vsum = vsum if self.vsum is None else self.vsum + vsum
        self.count = count if self.count is None else self.count + count

    def fold(self, n_code: int, prev_block: bool = True) -> None:
        """The (full) current block leaves the window's last place: with ``prev_block`` it becomes
        the previous block and the old previous block moves into the per-code sums; without,
        the current block moves into the sums."""
        if prev_block:
            if self.v_prev is not None:
                self._add_to_sums(self.v_prev, self.codes_prev, n_code)
            self.k_prev, self.v_prev, self.codes_prev = self.k, self.v, self.codes
        else:
            self._add_to_sums(self.v, self.codes, n_code)
        self.k = self.v = self.codes = None

    def append(self, k: torch.Tensor, v: torch.Tensor, codes: torch.Tensor) -> None:
        """Add one step's (N, H, 1, D) key/value and (N, H, 1) code to the current block."""
        if self.k is None:
            self.k, self.v, self.codes = k, v, codes
        else:
            self.k, self.v = torch.cat((self.k, k), 2), torch.cat((self.v, v), 2)
            self.codes = torch.cat((self.codes, codes), 2)
        self.length += 1
