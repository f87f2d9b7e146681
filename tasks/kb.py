"""Knowledge base: streaming ingest of the official ``knowledge.txt`` format into Parquet.

Format: one triple a line, ``head \\t relation \\t tail``; the head may end in a full-width
（disambiguation）. The file is read in newline-aligned chunks (``chunk_bytes``), so memory
is bounded by the chunk, never the file (the official KB is 20.56M lines, ~2 GB). Each
chunk takes a fast Arrow CSV path; a chunk with any irregularity (wrong column count, empty
field, NUL, bad UTF-8, stray CR) is re-read line by line in Python, which quarantines
exactly the bad lines with their numbers and reasons.

Output (``out_dir``): ``kb.parquet`` (subject, disambiguation, predicate, object),
``subjects/predicates/disambiguations.parquet`` (distinct values, sorted), quarantine and
manifest.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from models.seq_table import Utf8Table
from tasks.kgclue_data import Bad, all_lines_bad, file_problem, normalize_object, split_subject
from tasks.storage import atomic_path, read_manifest, reusable, sha256_file, write_manifest

SCHEMA_VERSION = 1
KB_SCHEMA = pa.schema([("subject", pa.string()), ("disambiguation", pa.string()),
                       ("predicate", pa.string()), ("object", pa.string())])
_SUBJECT_RE2 = "(?s)^(?P<b>[^（]+)（(?P<m>.+)）$"  # same rule as tasks.kgclue_data.split_subject
_WS_RE2 = "[\\x{00}-\\x{20}\\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}\\x{202f}\\x{205f}\\x{3000}]"
MAX_LINE_BYTES = 1 << 20
DISTINCT = ("subject", "predicate", "disambiguation")


class KbFormatError(ValueError):
    """The KB file is unusable (too many bad lines, empty, unreadable)."""


def iter_chunks(path: Path, chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(first line number, bytes) chunks that end on a newline (except possibly the last)."""
    first_line = 1
    with open(path, "rb") as f:
        pending: list[bytes] = []  # blocks of a line longer than a chunk (joined once: linear time)
        while True:
            block = f.read(chunk_bytes)
            if not block:
                if pending:
                    yield first_line, b"".join(pending)
                return
            cut = block.rfind(b"\n")
            if cut < 0:  # one very long line: keep reading
                pending.append(block)
                continue
            chunk = b"".join([*pending, block[:cut + 1]])
            pending = [block[cut + 1:]] if cut + 1 < len(block) else []
            yield first_line, chunk
            first_line += chunk.count(b"\n")


def _fast_chunk(chunk: bytes) -> pa.Table | None:
    """Parse a clean chunk with Arrow; None if anything is irregular (then go line by line)."""
    n_lines = chunk.count(b"\n") + (0 if chunk.endswith(b"\n") else 1)
    if b"\x00" in chunk or b"\r" in chunk or b"\n\n" in chunk or chunk.startswith((b"\n", b"\xef\xbb\xbf")):
        return None

    def refuse(_row):  # any malformed row: leave the chunk to the exact path
        return "error"

    try:
        table = pacsv.read_csv(
            io.BytesIO(chunk),
            read_options=pacsv.ReadOptions(column_names=["s", "p", "o"], block_size=max(1 << 20, len(chunk) + 1)),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False,
                                             newlines_in_values=False, ignore_empty_lines=False,
                                             invalid_row_handler=refuse),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in "spo"},
                                                 strings_can_be_null=False, check_utf8=True))
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError):
        return None
    if table.num_rows != n_lines:
        return None
    for c in "spo":  # an empty or whitespace-only field (the exact path quarantines it), a huge one
        if pc.any(pc.match_substring_regex(table[c], f"^{_WS_RE2}*$")).as_py() or \
                pc.max(pc.binary_length(table[c])).as_py() > MAX_LINE_BYTES:
            return None
    s = table["s"].combine_chunks()
    parts = pc.extract_regex(s, _SUBJECT_RE2)
    valid = parts.is_valid()
    base = pc.if_else(valid, pc.struct_field(parts, "b"), s)
    meaning = pc.fill_null(pc.struct_field(parts, "m"), "")
    o = table["o"].combine_chunks()
    return pa.table({"subject": base, "disambiguation": meaning, "predicate": table["p"].combine_chunks(),
                     "object": _normalize_objects(o)}, schema=KB_SCHEMA)


def _normalize_objects(o: pa.Array) -> pa.Array:
    """Python's ' '.join(o.split()) exactly: only rows holding whitespace go through Python."""
    has_ws = pc.match_substring_regex(o, _WS_RE2).to_numpy(zero_copy_only=False)
    if not has_ws.any():
        return o
    idx = np.flatnonzero(has_ws)
    fixed = pa.array([normalize_object(x) for x in o.take(pa.array(idx)).to_pylist()], pa.string())
    return pc.replace_with_mask(o, pa.array(has_ws), fixed)


def _slow_chunk(chunk: bytes, first_line: int, fname: str, bad: list[Bad]) -> pa.Table:
    """Line-by-line parse; quarantines each bad line with its reason."""
    rows: dict[str, list[str]] = {k: [] for k in KB_SCHEMA.names}
    lines = chunk.split(b"\n")
    if chunk.endswith(b"\n"):
        lines.pop()
    for i, raw in enumerate(lines):
        no = first_line + i
        if no == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if len(raw) > MAX_LINE_BYTES:
            bad.append(Bad(fname, no, f"line is {len(raw)} bytes, over the {MAX_LINE_BYTES}-byte limit",
                           "", raw[:80].decode("utf-8", "replace"), "fix the export"))
            continue
        if b"\x00" in raw:
            bad.append(Bad(fname, no, "NUL byte in line", "", raw[:200].decode("utf-8", "replace"),
                           "strip NUL bytes"))
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.append(Bad(fname, no, f"not UTF-8: byte 0x{raw[e.start]:02x} at column {e.start}", "",
                           raw[:200].decode("utf-8", "replace"), "re-encode the file as UTF-8"))
            continue
        if not text.strip():
            bad.append(Bad(fname, no, "blank line", "", "", "remove blank lines"))
            continue
        cols = text.split("\t")
        if len(cols) != 3:
            bad.append(Bad(fname, no, f"{len(cols)} tab-separated column(s), expected 3 "
                                      f"(head\\trelation\\ttail)", "", text,
                           "one triple per line; a tab or newline inside a field breaks the format"))
            continue
        if "\r" in text:
            bad.append(Bad(fname, no, "carriage return inside a field", "", text, "strip stray CR characters"))
            continue
        names = ("head", "relation", "tail")
        empty = [n for n, c in zip(names, cols) if not c.strip()]
        if empty:
            bad.append(Bad(fname, no, f"empty {empty[0]}", empty[0], text))
            continue
        base, meaning = split_subject(cols[0])
        rows["subject"].append(base)
        rows["disambiguation"].append(meaning)
        rows["predicate"].append(cols[1])
        rows["object"].append(normalize_object(cols[2]))
    return pa.table(rows, schema=KB_SCHEMA)


def ingest_kb(kb_path: str | Path, out_dir: str | Path, chunk_bytes: int = 64 << 20,
              max_bad_fraction: float = 0.01, progress=None) -> dict[str, Any]:
    """Stream ``kb_path`` into ``out_dir``; skip when already done for the same file."""
    kb_path, out_dir = Path(kb_path), Path(out_dir)
    if not kb_path.is_file():
        raise FileNotFoundError(f"--kb {kb_path}: no such file. Give the official knowledge.txt "
                                f"(head\\trelation\\ttail per line) or omit --kb for the mini-KB.")
    problem = file_problem(kb_path, "KB file")
    if problem:
        raise KbFormatError(f"{kb_path}: no usable triple: {problem}. The KB format is UTF-8 text, one "
                            f"head\\trelation\\ttail triple per line.")
    src_sha = sha256_file(kb_path)
    if (manifest := reusable(out_dir, source_sha256=src_sha, schema_version=SCHEMA_VERSION)) is not None:
        return manifest
    out_dir.mkdir(parents=True, exist_ok=True)
    bad: list[Bad] = []
    lines_in = rows_out = fast_chunks = slow_chunks = 0
    uniques: dict[str, list[pa.Array]] = {k: [] for k in DISTINCT}
    with atomic_path(out_dir / "kb.parquet") as tmp:
        with pq.ParquetWriter(tmp, KB_SCHEMA) as writer:
            for first_line, chunk in iter_chunks(kb_path, chunk_bytes):
                n = chunk.count(b"\n") + (0 if chunk.endswith(b"\n") else 1)
                lines_in += n
                table = _fast_chunk(chunk)
                if table is None:
                    slow_chunks += 1
                    table = _slow_chunk(chunk, first_line, kb_path.name, bad)
                else:
                    fast_chunks += 1
                if table.num_rows:
                    writer.write_table(table)
                rows_out += table.num_rows
                for k in DISTINCT:
                    uniques[k].append(pc.unique(table[k]))
                if progress:
                    progress(lines_in, rows_out, len(bad))
    if lines_in != rows_out + len(bad):
        raise AssertionError(f"row conservation violated: {lines_in} != {rows_out} + {len(bad)}")
    with atomic_path(out_dir / "quarantine.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(b.record(), ensure_ascii=False) + "\n" for b in bad), "utf-8")
    if rows_out == 0:
        raise KbFormatError(f"{kb_path}: no usable triple: {all_lines_bad(bad)}. Every bad line is in "
                            f"{out_dir / 'quarantine.jsonl'}; the KB format is UTF-8 text, one "
                            f"head\\trelation\\ttail triple per line.")
    if len(bad) / lines_in > max_bad_fraction:
        first = "; ".join(f"line {b.line}: {b.reason}" for b in bad[:3])
        raise KbFormatError(f"{kb_path}: {len(bad)} of {lines_in} lines bad ({len(bad) / lines_in:.1%} > "
                            f"max_bad_fraction {max_bad_fraction:.1%}); first: {first}. Every bad line "
                            f"is in {out_dir / 'quarantine.jsonl'}; fix the file or raise --max-bad-fraction.")
    files: dict[str, dict[str, Any]] = {"kb.parquet": {"rows": rows_out}, "quarantine.jsonl": {"rows": len(bad)}}
    counts = {}
    for k in DISTINCT:
        values = pc.unique(pa.chunked_array(uniques[k], pa.string()).combine_chunks())
        if k == "disambiguation" and not pc.any(pc.equal(values, "")).as_py():
            values = pa.concat_arrays([pa.array([""], pa.string()), values])
        values = values.take(pc.sort_indices(values))
        name = f"{k}s.parquet" if k != "disambiguation" else "disambiguations.parquet"
        with atomic_path(out_dir / name) as tmp:
            pq.write_table(pa.table({k: values}), tmp)
        files[name] = {"rows": len(values)}
        counts[k] = len(values)
    return write_manifest(out_dir, files, schema_version=SCHEMA_VERSION, source=str(kb_path),
                          source_sha256=src_sha, lines=lines_in, triples=rows_out, quarantined=len(bad),
                          distinct=counts, fast_chunks=fast_chunks, slow_chunks=slow_chunks)


def utf8_table(arr: pa.Array) -> Utf8Table:
    """Zero-copy numpy views of an Arrow string array's UTF-8 buffer and offsets."""
    arr = arr.cast(pa.large_string())
    _, off_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(off_buf, dtype=np.int64)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return Utf8Table(data, offsets)


def read_distinct(kb_dir: str | Path, column: str) -> pa.Array:
    """Sorted distinct values of ``column`` (subject, predicate or disambiguation)."""
    name = "disambiguations.parquet" if column == "disambiguation" else f"{column}s.parquet"
    read_manifest(kb_dir)
    return pq.read_table(Path(kb_dir) / name)[column].combine_chunks()
