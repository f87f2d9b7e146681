"""KgCLUE JSON lines -> validated Arrow tables -> Parquet, with a line-by-line quarantine.

Every input line ends up in exactly one place: a row of ``{split}.parquet`` or a record of
``quarantine.jsonl`` (file, line, field, value, reason, fix). ``rows in = rows out +
quarantined`` is checked before the manifest is written, and a file whose bad fraction
exceeds ``max_bad_fraction`` fails the step with a message that says how to proceed.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.storage import atomic_path, read_manifest, sha256_file, write_manifest

SCHEMA_VERSION = 1
SPLITS = ("train", "dev", "test_public", "test")
LABELLED = ("train", "dev", "test_public")
ANSWER_SEP = " ||| "
MAX_LINE_BYTES = 1 << 20
QA_SCHEMA = pa.schema([
    ("split", pa.string()), ("id", pa.int64()), ("line", pa.int32()), ("question", pa.string()),
    ("subject", pa.string()), ("disambiguation", pa.string()), ("predicate", pa.string()),
    ("object", pa.string()),
])
# "Name（meaning）": the disambiguation is the full-width bracket part at the end, split at the
# first "（" (bojone's subject_split); "完美（中国）有限公司" has none.
_SUBJECT_RE = re.compile(r"^([^（]+)（(.+)）$", re.S)


class DataQualityError(ValueError):
    """Too many bad lines in an input file (details in the message and the quarantine)."""


def split_subject(subject: str) -> tuple[str, str]:
    """'刘晓华（广东工业大学教授）' -> ('刘晓华', '广东工业大学教授'); no brackets -> (s, '')."""
    m = _SUBJECT_RE.match(subject)
    return (m.group(1), m.group(2)) if m else (subject, "")


def join_subject(base: str, disambiguation: str) -> str:
    """Inverse of :func:`split_subject`."""
    return f"{base}（{disambiguation}）" if disambiguation else base


def normalize_object(o: str) -> str:
    """The KB builder's object normalisation: collapse whitespace (bojone's baseline)."""
    return " ".join(o.split())


@dataclass
class Bad:
    """One quarantined line."""

    file: str
    line: int
    reason: str
    field: str = ""
    value: str = ""
    fix: str = ""

    def record(self) -> dict[str, Any]:
        v = self.value if len(self.value) <= 200 else self.value[:200] + f"…(+{len(self.value) - 200} chars)"
        return {"file": self.file, "line": self.line, "field": self.field, "value": v,
                "reason": self.reason, "fix": self.fix}


@dataclass
class SplitResult:
    split: str
    path: str
    rows_in: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    bad: list[Bad] = field(default_factory=list)


def iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes without the newline); a final newline adds no line."""
    with open(path, "rb") as f:
        for no, raw in enumerate(f, 1):
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            yield no, raw


def parse_line(raw: bytes, no: int, fname: str, split: str, seen: dict[int, int]) -> dict | Bad:
    """Validate one raw line; return a row dict or the reason it is quarantined."""
    def bad(reason: str, fld: str = "", value: Any = "", fix: str = "") -> Bad:
        return Bad(fname, no, reason, fld, value if isinstance(value, str) else repr(value), fix)

    if no == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # UTF-8 byte-order mark
    if raw.endswith(b"\r"):
        raw = raw[:-1]  # CRLF line ending
    if len(raw) > MAX_LINE_BYTES:
        return bad(f"line is {len(raw)} bytes, over the {MAX_LINE_BYTES}-byte limit", "",
                   raw[:80].decode("utf-8", "replace"), "split the record or fix the export")
    if b"\x00" in raw:
        return bad("NUL byte in line", "", raw.replace(b"\x00", b"\\0")[:200].decode("utf-8", "replace"),
                   "strip NUL bytes (binary corruption?)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return bad(f"not UTF-8: byte 0x{raw[e.start]:02x} at column {e.start}", "",
                   raw[:200].decode("utf-8", "replace"), "re-encode the file as UTF-8")
    if not text.strip():
        return bad("blank line", fix="remove blank lines")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return bad(f"not JSON: {e.msg} at column {e.colno}", "", text, "each line must be one JSON object")
    if not isinstance(obj, dict):
        return bad(f"not a JSON object but {type(obj).__name__}", "", text, "each line must be one JSON object")
    required = ("id", "question") if split == "test" else ("id", "question", "answer")
    for name in required:
        if name not in obj:
            return bad(f"missing field '{name}'", name, text, f"add '{name}'")
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, int):
        return bad(f"field 'id' must be an integer, got {type(rid).__name__}", "id", rid)
    if not -(1 << 63) <= rid < (1 << 63):
        return bad("field 'id' does not fit in 64 bits", "id", rid)
    q = obj["question"]
    if not isinstance(q, str):
        return bad(f"field 'question' must be a string, got {type(q).__name__}", "question", q)
    if not q.strip():
        return bad("empty question", "question", q, "drop the line or fill in the question")
    row = {"split": split, "id": rid, "line": no, "question": q, "subject": None,
           "disambiguation": None, "predicate": None, "object": None}
    if "answer" in obj:
        a = obj["answer"]
        if not isinstance(a, str):
            return bad(f"field 'answer' must be a string, got {type(a).__name__}", "answer", a)
        parts = a.split(ANSWER_SEP)
        if len(parts) != 3:
            return bad(f"answer has {len(parts)} part(s), expected 3 separated by '{ANSWER_SEP}'",
                       "answer", a, "write 'subject ||| predicate ||| object'")
        s, p, o = (x.strip() for x in parts)
        for name, value in (("subject", s), ("predicate", p), ("object", o)):
            if not value:
                return bad(f"empty {name} in answer", "answer", a)
        base, meaning = split_subject(s)
        row.update(subject=base, disambiguation=meaning, predicate=p, object=o)
    if rid in seen:
        return bad(f"duplicate id {rid} (first at line {seen[rid]})", "id", rid, "ids must be unique per file")
    seen[rid] = no
    return row


def read_split(path: Path, split: str) -> SplitResult:
    """Parse one KgCLUE file line by line."""
    res = SplitResult(split, str(path))
    seen: dict[int, int] = {}
    for no, raw in iter_lines(path):
        res.rows_in += 1
        out = parse_line(raw, no, path.name, split, seen)
        (res.bad if isinstance(out, Bad) else res.rows).append(out)
    return res


def discover(data_dir: Path) -> dict[str, Path]:
    """The KgCLUE files present in ``data_dir`` (train/dev/test_public/test.json)."""
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir}: not a directory. Point it at the folder "
                                f"holding KgCLUE's train.json/dev.json/test.json.")
    found = {s: data_dir / f"{s}.json" for s in SPLITS if (data_dir / f"{s}.json").is_file()}
    if not found:
        raise FileNotFoundError(f"--data-dir {data_dir}: none of {[s + '.json' for s in SPLITS]} "
                                f"found. Point it at KgCLUE's datasets/ folder.")
    return found


def fingerprint(files: dict[str, Path], **config: Any) -> str:
    """A content hash of the inputs and config: the step's cache key."""
    import hashlib
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for split, p in sorted(files.items()):
        h.update(f"{split}:{sha256_file(p)}".encode())
    return h.hexdigest()


def prepare(files: dict[str, Path], out_dir: Path, max_bad_fraction: float = 0.01,
            ) -> dict[str, Any]:
    """Validate every file, write Parquet + quarantine + manifest; return the manifest.

    Skips the work when ``out_dir`` already holds a complete output for the same inputs.
    """
    if not 0 <= max_bad_fraction <= 1:
        raise ValueError(f"max_bad_fraction={max_bad_fraction}: must be within [0, 1]")
    out_dir = Path(out_dir)
    key = fingerprint(files, max_bad_fraction=max_bad_fraction, schema_version=SCHEMA_VERSION)
    try:
        manifest = read_manifest(out_dir)
        if manifest.get("inputs_sha256") == key:
            return manifest
    except Exception:  # noqa: BLE001 - anything short of a valid manifest means rebuild
        pass
    (out_dir / "manifest.json").unlink(missing_ok=True)
    results = [read_split(p, split) for split, p in files.items()]
    quarantine = [b.record() for r in results for b in r.bad]
    with atomic_path(out_dir / "quarantine.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in quarantine), "utf-8")
    failures = []
    for r in results:
        if r.rows_in and len(r.bad) / r.rows_in > max_bad_fraction:
            reasons = "; ".join(f"line {b.line}: {b.reason}" for b in r.bad[:3])
            failures.append(f"{r.path}: {len(r.bad)} of {r.rows_in} lines bad "
                            f"({len(r.bad) / r.rows_in:.1%} > max_bad_fraction "
                            f"{max_bad_fraction:.1%}); first: {reasons}")
    if failures:
        raise DataQualityError("\n".join(failures) + f"\nEvery bad line is in "
                               f"{out_dir / 'quarantine.jsonl'}; fix the input or raise "
                               f"--max-bad-fraction.")
    files_meta: dict[str, dict[str, Any]] = {}
    splits_meta = {}
    for r in results:
        table = pa.Table.from_pylist(r.rows, schema=QA_SCHEMA)
        assert r.rows_in == table.num_rows + len(r.bad), "row conservation violated"
        name = f"{r.split}.parquet"
        with atomic_path(out_dir / name) as tmp:
            pq.write_table(table, tmp)
        files_meta[name] = {"rows": table.num_rows}
        splits_meta[r.split] = {"source": r.path, "lines": r.rows_in, "rows": table.num_rows,
                                "quarantined": len(r.bad)}
    files_meta["quarantine.jsonl"] = {"rows": len(quarantine)}
    return write_manifest(out_dir, files_meta, schema_version=SCHEMA_VERSION, inputs_sha256=key,
                          splits=splits_meta)


def load_split(data_out: Path, split: str) -> pa.Table:
    """Read one prepared split (only from a complete output)."""
    manifest = read_manifest(data_out)
    name = f"{split}.parquet"
    if name not in manifest["files"]:
        raise KeyError(f"{data_out}: no split '{split}' (have {sorted(manifest['splits'])})")
    return pq.read_table(Path(data_out) / name)
