"""Character-level vocabulary for Chinese KBQA: one token per Unicode code point.

Ids: 0 [PAD], 1 [UNK], 2 [BOS], 3 [EOS], 4 [SEP], then characters in code-point order
(so token-id order of a string equals its code-point order, which keeps sorted KB strings
sorted as token sequences). Whitespace is kept as a character: objects and names may hold
spaces ("GB/T 6983-2008").
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[SEP]")
PAD, UNK, BOS, EOS, SEP = range(5)
N_SPECIAL = len(SPECIALS)
MAX_CODEPOINT = 0x110000


@dataclass(frozen=True)
class CharVocab:
    """An immutable char vocabulary; build with :meth:`build`, persist with :meth:`to_json`."""

    chars: tuple[str, ...]
    _lut: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        cps = np.fromiter((ord(c) for c in self.chars), dtype=np.int64, count=len(self.chars))
        if len(cps) and (np.any(np.diff(cps) <= 0)):
            raise ValueError("CharVocab.chars must be unique single characters in code-point order")
        lut = np.full(MAX_CODEPOINT, UNK, dtype=np.int32)  # code point -> token id
        lut[cps] = np.arange(N_SPECIAL, N_SPECIAL + len(cps), dtype=np.int32)
        object.__setattr__(self, "_lut", lut)

    @classmethod
    def build(cls, texts: Iterable[str]) -> "CharVocab":
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls(tuple(sorted(seen)))

    def __len__(self) -> int:
        return N_SPECIAL + len(self.chars)

    @property
    def token_dtype(self) -> type:
        return np.uint16 if len(self) <= np.iinfo(np.uint16).max else np.int32

    def encode(self, text: str) -> list[int]:
        return self.encode_np(text).tolist()

    def encode_np(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as an int32 array (unknown characters -> [UNK])."""
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        return self._lut[cps]

    def lookup(self, codepoints: np.ndarray) -> np.ndarray:
        """Token ids (int32) of an array of code points."""
        return self._lut[codepoints]

    def decode(self, ids: Sequence[int], stop_at_eos: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == EOS and stop_at_eos:
                break
            out.append(SPECIALS[i] if i < N_SPECIAL else self.chars[i - N_SPECIAL])
        return "".join(out)

    def coverage(self, text: str) -> float:
        ids = self.encode_np(text)
        return 1.0 if len(ids) == 0 else float(np.mean(ids != UNK))

    def to_json(self) -> str:
        return json.dumps({"specials": list(SPECIALS), "chars": "".join(self.chars)},
                          ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "CharVocab":
        obj = json.loads(text)
        if tuple(obj.get("specials", ())) != SPECIALS:
            raise ValueError(f"vocabulary specials {obj.get('specials')} != {list(SPECIALS)}")
        return cls(tuple(obj["chars"]))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()
