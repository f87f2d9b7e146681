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

from tasks.storage import atomic_path, read_manifest, reusable, sha256_file, write_manifest

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
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_CONTROL_RE = re.compile("[\x00-\x1f\x7f]")


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
        v = v.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate cannot be written
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
        return bad(f"not JSON: {e.msg} (column {e.colno})", "", text, "each line must be one JSON object")
    except RecursionError:
        return bad("not JSON: nested too deeply", "", text, "each line must be one flat JSON object")
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
    for name in ("question", "answer"):
        v = obj.get(name)
        if isinstance(v, str) and _SURROGATE_RE.search(v):
            return bad(f"field '{name}' holds a lone UTF-16 surrogate (\\u{ord(_SURROGATE_RE.search(v)[0]):04x}), "
                       f"which is not valid Unicode", name, v.encode("utf-8", "backslashreplace").decode(),
                       "fix the exporter's \\u escapes (a surrogate pair must be complete)")
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
        for name, value in (("subject", s), ("predicate", p)):
            if _CONTROL_RE.search(value):
                return bad(f"{name} in answer holds a control character "
                           f"({_CONTROL_RE.search(value)[0]!r}); the knowledge base is tab/newline-separated",
                           "answer", a, f"remove tabs, newlines and control characters from the {name}")
        base, meaning = split_subject(s)
        row.update(subject=base, disambiguation=meaning, predicate=p, object=o)
    if rid in seen:
        return bad(f"duplicate id {rid} (first at line {seen[rid]})", "id", rid, "ids must be unique per file")
    seen[rid] = no
    return row


_WIDE_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32LE"), (b"\x00\x00\xfe\xff", "UTF-32BE"),
              (b"\xff\xfe", "UTF-16LE"), (b"\xfe\xff", "UTF-16BE"))


def file_problem(path: Path, what: str = "file") -> str | None:
    """A whole-file problem seen in its first bytes (empty, UTF-16/32, binary, CR-only line
    ends), as 'reason; fix'. Such a file is refused whatever ``max_bad_fraction`` is."""
    size = path.stat().st_size
    if size == 0:
        return f"empty {what} (0 bytes); fix: export it again, or remove it"
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    for bom, enc in _WIDE_BOMS:
        if head.startswith(bom):
            return (f"encoded as {enc} (byte-order mark {bom.hex(' ')}), not UTF-8; fix: re-encode it, "
                    f"e.g. iconv -f {enc} -t UTF-8 {path.name} > {path.stem}.utf8{path.suffix}")
    nul = head.count(b"\x00")
    if nul > len(head) // 4:
        return (f"{nul / len(head):.0%} of its first {len(head):,} bytes are NUL: binary, or "
                f"UTF-16 without a byte-order mark; fix: give the UTF-8 text file")
    if b"\n" not in head and b"\r" in head:
        return (f"CR-only (classic Mac) line endings, so it reads as one line; fix: convert them, "
                f"e.g. tr '\\r' '\\n' < {path.name} > {path.stem}.lf{path.suffix}")
    return None


def all_lines_bad(bad: list[Bad], first_text: bytes = b"") -> str:
    """Why a file with lines gave no row at all (every line quarantined), with the fix."""
    from collections import Counter
    kinds = Counter(b.reason.split(":")[0].split(" (")[0] for b in bad)
    kind, n = kinds.most_common(1)[0]
    first = "; ".join(f"line {b.line}: {b.reason}" for b in bad[:3])
    if first_text.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        fix = ("it looks like one JSON array, but KgCLUE files are JSON lines (one object per line); "
               "convert it, e.g. jq -c '.[]'")
    elif kind == "not UTF-8" and n == len(bad):
        fix = ("the file is not UTF-8 (GBK/GB18030?); re-encode it, e.g. iconv -f GB18030 -t UTF-8")
    else:
        fix = "fix the file (every line was quarantined)"
    return f"all {len(bad)} line(s) bad ({n} x {kind}); first: {first}; fix: {fix}"


def count_lines(path: Path, bufsize: int = 1 << 20) -> int:
    """Lines of a file counted from its bytes alone (newlines, plus an unterminated last line),
    independently of the parser, for the conservation check."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def check_conservation(path: Path, lines_in: int, rows_out: int, quarantined: int) -> None:
    """count in = out + quarantined, with ``lines_in`` counted from the file's bytes: a line the
    parser dropped or counted twice fails here, before anything is published."""
    if lines_in != rows_out + quarantined:
        raise AssertionError(f"{path}: row conservation violated: the file has {lines_in} lines but "
                             f"{rows_out} rows + {quarantined} quarantined were produced; nothing was written. "
                             f"This is a bug in tasks/kgclue_data.py, not in the file: please report it")


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
    for split, p in files.items():
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p}: no such KgCLUE file (split '{split}'); check --data-dir / --labelled")
    key = fingerprint(files, max_bad_fraction=max_bad_fraction, schema_version=SCHEMA_VERSION)
    if (manifest := reusable(out_dir, inputs_sha256=key)) is not None:
        return manifest
    problems = {split: file_problem(Path(p)) for split, p in files.items()}
    results = [read_split(Path(p), split) for split, p in files.items() if not problems[split]]
    quarantine = [b.record() for r in results for b in r.bad]
    with atomic_path(out_dir / "quarantine.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in quarantine), "utf-8")
    failures = [f"{files[split]}: {msg}" for split, msg in problems.items() if msg]
    too_many = False
    for r in results:
        if r.rows_in and not r.rows:
            with open(r.path, "rb") as f:
                failures.append(f"{r.path}: no usable line: {all_lines_bad(r.bad, f.read(4096))}")
        elif r.rows_in and len(r.bad) / r.rows_in > max_bad_fraction:
            too_many = True
            reasons = "; ".join(f"line {b.line}: {b.reason}" for b in r.bad[:3])
            failures.append(f"{r.path}: {len(r.bad)} of {r.rows_in} lines bad "
                            f"({len(r.bad) / r.rows_in:.1%} > max_bad_fraction "
                            f"{max_bad_fraction:.1%}); first: {reasons}")
    if failures:
        raise DataQualityError("\n".join(failures) + f"\nEvery bad line is in "
                               f"{out_dir / 'quarantine.jsonl'} (file, line, field, reason, fix)"
                               + ("; fix those lines or raise --max-bad-fraction." if too_many else "."))
    files_meta: dict[str, dict[str, Any]] = {}
    splits_meta = {}
    for r in results:
        table = pa.Table.from_pylist(r.rows, schema=QA_SCHEMA)
        check_conservation(Path(r.path), count_lines(Path(r.path)), table.num_rows, len(r.bad))
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
