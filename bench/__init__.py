"""Benchmarks: each prints one JSON document and measures its named baseline in the same run."""
from __future__ import annotations

import json
from pathlib import Path


def emit(result: dict, path: Path | None) -> None:
    """Print ``result`` as JSON; with ``path``, write it there too."""
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
