"""``trieflow``: list the flows and run one, with the flow's own command line.

    trieflow list
    trieflow run kgclue-pipeline --preset tiny --data-dir ../shared/data/kgclue --out runs/demo
    trieflow run data-prep --help

Each flow keeps its ``python -m flows.NAME`` entry point; this command only finds them by
their Prefect names (the names the UI and prefect.yaml use).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

# Prefect flow name -> (module, one line[, entry function; default main]). A module not present
# in this checkout is not listed. Every flow in prefect.yaml is here (tests/test_config_seams.py).
FLOWS: dict[str, tuple[str, ...]] = {
    "kgclue-pipeline": ("flows.kgclue", "KgCLUE: data prep -> KB -> vocab -> trie -> train -> re-rankers -> evaluate"),
    "train-seq2seq": ("flows.kgclue", "KgCLUE data stages (cached) + the generator's training alone",
                      "main_train_seq2seq"),
    "data-prep": ("flows.data_prep", "KgCLUE files -> validated Parquet + quarantine, KB ingest, vocab, trie"),
    "sector-montecarlo": ("flows.sector_montecarlo", "sector probability: Monte Carlo on Ray vs the exact formula"),
    "long-context-lm": ("flows.long_context_lm", "decoder-only LM at length N, evaluated at N..16N per attention kind"),
    "vae-density": ("flows.vae_density", "VAE trained with the IWAE bound; importance-sampled log p(x)"),
}


def available() -> dict[str, tuple[str, ...]]:
    return {n: v for n, v in FLOWS.items() if importlib.util.find_spec(v[0]) is not None}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flows = available()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip())
        return 0
    if argv[0] == "list":
        width = max(map(len, flows))
        for name, (module, line, *entry) in flows.items():
            how = f"trieflow run {name}" if entry else f"python -m {module}"
            print(f"{name:<{width}}  {how:<34} {line}")
        return 0
    if argv[0] != "run" or len(argv) < 2:
        print(f"trieflow: unknown command {' '.join(argv)!r}; use 'trieflow list' or 'trieflow run FLOW [ARGS]'",
              file=sys.stderr)
        return 2
    name = argv[1]
    if name not in flows:
        print(f"trieflow: no flow {name!r}; available: {', '.join(flows)}", file=sys.stderr)
        return 2
    module = importlib.import_module(flows[name][0])
    entry = getattr(module, flows[name][2] if len(flows[name]) > 2 else "main")
    sys.argv = [f"trieflow run {name}", *argv[2:]]
    rc = entry(argv[2:])
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
