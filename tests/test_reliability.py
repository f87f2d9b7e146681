"""Nothing lost: fault injection, a bad-input corpus, resume, and loopback-only services.

docs/RELIABILITY.md lists every fault, what happens, and the test here (or in
tests/test_train.py) that proves it. Heavy pieces run in subprocesses with their own
PREFECT_HOME, RAY_TMPDIR and a tag in their environment, so the processes they leave (if
any) are found by that tag and killed by pid, never by name; a local Ray started by another
test session on this machine is never touched.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT
from tests.fixtures_bad_inputs import Case, all_cases, kb_cases, kgclue_cases
from tests.test_operations import Stack, _listening, free_port, stop_process

PY = sys.executable
TAG = "TRIEFLOW_TEST_TAG"
OUR_EXCEPTIONS = ("tasks.kgclue_data.DataQualityError", "tasks.kb.KbFormatError",
                  "tasks.storage.IncompleteOutput", "FileNotFoundError: --data-dir", "FileNotFoundError: --kb")
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d+ \| ")


from flows._env import DEFAULTS as ENV_DEFAULTS  # noqa: E402


# ----------------------------------------------------------------------------- helpers
def short_tmp(prefix: str) -> Path:
    """A short path under /tmp: Ray's unix sockets live under RAY_TMPDIR (108-byte limit)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def proc_env(prefect_home: Path, api_url: str | None = None, ray_tmp: Path | None = None,
             tag: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_", "TRIEFLOW_"))}
    env.update(ENV_DEFAULTS)  # the flows' embedded defaults, then this run's own home and tag
    env.update({"PYTHONPATH": str(ROOT), "PREFECT_HOME": str(prefect_home), TAG: tag or uuid.uuid4().hex})
    if api_url:
        env["PREFECT_API_URL"] = api_url
    if ray_tmp:
        env["RAY_TMPDIR"] = str(ray_tmp)
    env.update(extra)
    return env


def tagged(tag: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``tag`` (every descendant of a tagged run)."""
    me = os.getpid()
    out = []
    for p in psutil.process_iter():
        if p.pid == me:
            continue
        try:
            if p.environ().get(TAG) == tag and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def _children(p: psutil.Process) -> list[psutil.Process]:
    try:
        return p.children(recursive=True)
    except psutil.Error:
        return []


def describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            pass
    return out


def wait_gone(tag: str, timeout: float) -> list[str]:
    """Wait for the tagged processes to exit; kill (by pid) and return any that did not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = tagged(tag)
        if not left:
            return []
        time.sleep(0.5)
    left = tagged(tag)
    names = describe(left)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=10)
    return names


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=30)


def check_stderr(err: str, prog: str, failed: bool) -> None:
    """No library traceback reaches the user; a failure ends with our one-paragraph message."""
    lines = err.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            j = i + 1
            while j < len(lines) and (lines[j].startswith(" ") or not lines[j].strip()):
                j += 1
            assert j < len(lines) and lines[j].startswith(OUR_EXCEPTIONS), (
                f"a traceback ends outside our exception classes: {lines[j] if j < len(lines) else '<eof>'}\n"
                + "\n".join(lines[max(0, i - 3):j + 3]))
        assert not line.startswith(("During handling of the above exception",
                                    "The above exception was the direct cause")), "chained library exception"
    if failed:  # an expected refusal reads as one clear error: no traceback at all, ours included
        assert not any(line.startswith("Traceback (most recent call last):") for line in lines), (
            "a refusal printed a traceback:\n" + err[-3000:])
        starts = [i for i, line in enumerate(lines) if line.startswith(f"{prog}: error: ")]
        assert starts, f"no '{prog}: error:' message on stderr:\n{err[-3000:]}"
        tail = lines[starts[-1]:]
        while tail and not tail[-1].strip():
            tail.pop()
        assert all(s.strip() for s in tail), f"the final message is not one paragraph:\n{tail}"
        assert not any(LOG_LINE.match(s) or s.startswith(("Traceback", "---")) for s in tail), \
            f"something was printed after our message:\n" + "\n".join(tail)


def run_cli(module: str, args: list[str], env: dict[str, str], timeout: float,
            log: Path | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([PY, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    if log is not None:
        log.write_text(f"$ {module} {' '.join(args)}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}")
    return r


# ----------------------------------------------------------------------------- one real server
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`prefect server start --host 127.0.0.1` with a temporary PREFECT_HOME (tests/test_operations)."""
    home = tmp_path_factory.mktemp("reliability-prefect")
    port = free_port()
    env = proc_env(home, api_url=f"http://127.0.0.1:{port}/api",
                   PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
                   PATH=f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    s = Stack(home=home, port=port, env=env)
    try:
        s.server = s.spawn("server", "server", "start", "--host", "127.0.0.1", "--port", str(port))
        s.wait_healthy(timeout=120)
        listening = _listening(s.server.pid)
        assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening
        yield s
    finally:
        if s.server is not None:
            stop_process(s.server, (signal.SIGTERM,), wait_s=20)
        assert s.server is None or s.server.poll() is not None


def flow_runs(stack: Stack, flow_name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    with stack.client_settings(), get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])), limit=200)


def task_runs_of(stack: Stack, flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    with stack.client_settings(), get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


@pytest.fixture(scope="module")
def good_sample(tmp_path_factory) -> Path:
    from tasks.sample import write_sample
    return write_sample(tmp_path_factory.mktemp("good") / "kgclue", n_train=40, n_dev=10, n_test=10)


# ============================================================================ 4. bad inputs
KG_CASES = kgclue_cases()
KB_CASES = kb_cases()


def test_corpus_is_big_and_varied():
    cases = all_cases()  # names are unique
    assert len(cases) == len(KG_CASES) + len(KB_CASES) >= 30
    assert {c.outcome for c in KG_CASES} == {c.outcome for c in KB_CASES} == {"accept", "quarantine", "error"}


def _expect_quarantine(case: Case, records: list[dict]) -> None:
    got = {r["line"]: r for r in records if r["file"] == case.name}
    assert set(got) == set(case.bad_lines), f"{case.name}: quarantined lines {sorted(got)}, expected {case.bad_lines}"
    for line, fragment in case.bad_lines.items():
        assert fragment in got[line]["reason"], f"{case.name} line {line}: {got[line]['reason']!r} lacks {fragment!r}"


def _quarantine_records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text("utf-8").splitlines()]


@pytest.mark.parametrize("case", KG_CASES, ids=lambda c: c.name)
def test_kgclue_bad_file_plain_function(case: Case, tmp_path):
    import pyarrow.parquet as pq

    from tasks.kgclue_data import DataQualityError, prepare
    from tasks.storage import IncompleteOutput, read_manifest
    src = case.write(tmp_path)
    if case.outcome == "error":
        for fraction in (0.01, 1.0):  # a whole-file problem is refused whatever the threshold
            with pytest.raises(DataQualityError) as e:
                prepare({"train": src}, tmp_path / f"out{fraction}", max_bad_fraction=fraction)
            msg = str(e.value)
            assert str(src) in msg and all(f in msg for f in case.error), msg
            with pytest.raises(IncompleteOutput):
                read_manifest(tmp_path / f"out{fraction}")
        return
    m = prepare({"train": src}, tmp_path / "out", max_bad_fraction=1.0)
    split = m["splits"]["train"]
    assert split["lines"] == case.lines == split["rows"] + split["quarantined"]   # nothing lost
    assert split["quarantined"] == len(case.bad_lines)
    _expect_quarantine(case, _quarantine_records(tmp_path / "out" / "quarantine.jsonl"))
    rows = pq.read_table(tmp_path / "out" / "train.parquet").to_pylist()
    assert len(rows) == split["rows"]
    if "subjects" in case.check:
        got = {r["subject"]: r["disambiguation"] for r in rows}
        for s, d in case.check["subjects"].items():
            assert got.get(s) == d, (s, got.get(s))
    if "first_id" in case.check:
        assert rows[0]["id"] == case.check["first_id"] and rows[0]["question"].startswith("主体0")
    if case.outcome == "quarantine":  # at the default threshold: a clear error naming file, line, reason, fix
        with pytest.raises(DataQualityError) as e:
            prepare({"train": src}, tmp_path / "strict")
        msg = str(e.value)
        line = min(case.bad_lines)
        assert str(src) in msg and f"line {line}: " in msg and case.bad_lines[line] in msg, msg
        assert "raise --max-bad-fraction" in msg and "quarantine.jsonl" in msg


@pytest.mark.parametrize("case", KB_CASES, ids=lambda c: c.name)
def test_kb_bad_file_plain_function(case: Case, tmp_path):
    import pyarrow.parquet as pq

    from tasks.kb import KbFormatError, ingest_kb
    from tasks.storage import IncompleteOutput, read_manifest
    src = case.write(tmp_path)
    if case.outcome == "error":
        for fraction in (0.01, 1.0):
            with pytest.raises(KbFormatError) as e:
                ingest_kb(src, tmp_path / f"out{fraction}", max_bad_fraction=fraction)
            msg = str(e.value)
            assert str(src) in msg and all(f in msg for f in case.error), msg
            with pytest.raises(IncompleteOutput):
                read_manifest(tmp_path / f"out{fraction}")
        return
    tables = []
    for chunk in (64 << 20, 64):  # one chunk (Arrow fast path) and many tiny ones (exact path, boundaries)
        out = tmp_path / f"out{chunk}"
        m = ingest_kb(src, out, chunk_bytes=chunk, max_bad_fraction=1.0)
        assert m["lines"] == case.lines == m["triples"] + m["quarantined"]
        assert m["quarantined"] == len(case.bad_lines)
        _expect_quarantine(case, _quarantine_records(out / "quarantine.jsonl"))
        tables.append(pq.read_table(out / "kb.parquet"))
    assert tables[0].equals(tables[1]), "chunking changed the KB"
    rows = tables[0].to_pylist()
    if "subjects" in case.check:
        got = {r["subject"]: r["disambiguation"] for r in rows}
        for s, d in case.check["subjects"].items():
            assert got.get(s) == d, (s, got.get(s))
    if "first_subject" in case.check:
        assert rows[0]["subject"] == case.check["first_subject"]
        assert rows[0]["disambiguation"] == case.check["first_disambiguation"]
    if "objects" in case.check:
        assert case.check["objects"] <= {r["object"] for r in rows}
    if case.outcome == "quarantine":
        with pytest.raises(KbFormatError) as e:
            ingest_kb(src, tmp_path / "strict")
        msg = str(e.value)
        line = min(case.bad_lines)
        assert str(src) in msg and f"line {line}: " in msg and "raise --max-bad-fraction" in msg, msg


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bad_kgclue_files_through_the_cli(server, good_sample, tmp_path):
    """Two CLI calls cover every KgCLUE file: quarantined (threshold 1) and refused (default)."""
    files = {}
    for c in KG_CASES:
        files[c.name] = c.write(tmp_path)
    t0 = time.perf_counter()
    # (a) accepted and quarantined files, --max-bad-fraction 1: the flow completes, nothing lost
    kept = [c for c in KG_CASES if c.outcome != "error"]
    out = tmp_path / "quarantined"
    r = run_cli("flows.data_prep", ["--data-dir", str(good_sample), "--out", str(out), "--max-bad-fraction", "1",
                                    "--labelled", *[str(files[c.name]) for c in kept]],
                server.env, timeout=240, log=tmp_path / "cli-a.log")
    assert r.returncode == 0, r.stderr[-4000:]
    check_stderr(r.stderr, "data-prep", failed=False)
    manifest = json.loads((out / "data" / "manifest.json").read_text("utf-8"))
    records = _quarantine_records(out / "data" / "quarantine.jsonl")
    for i, c in enumerate(kept):
        split = manifest["splits"][f"labelled-{i}-{Path(c.name).stem}"]
        assert split["lines"] == c.lines == split["rows"] + split["quarantined"], (c.name, split)
        assert split["quarantined"] == len(c.bad_lines), (c.name, split)
        _expect_quarantine(c, records)
    metrics = json.loads((out / "metrics.json").read_text("utf-8"))
    assert metrics["quarantined"] == sum(len(c.bad_lines) for c in kept)
    # (b) every file at the default threshold: one clean error naming each bad file, line, reason, fix
    r = run_cli("flows.data_prep", ["--data-dir", str(good_sample), "--out", str(tmp_path / "strict"),
                                    "--labelled", *[str(f) for f in files.values()]],
                server.env, timeout=240, log=tmp_path / "cli-b.log")
    assert r.returncode == 1, r.stderr[-4000:]
    check_stderr(r.stderr, "data-prep", failed=True)
    final = r.stderr[r.stderr.rindex("data-prep: error: "):]
    for c in KG_CASES:
        if c.outcome == "accept":
            assert str(files[c.name]) not in final, c.name
            continue
        mine = [s for s in final.splitlines() if str(files[c.name]) in s]
        assert len(mine) == 1, (c.name, final)
        if c.outcome == "error":
            assert all(f in mine[0] for f in c.error), (c.name, mine[0])
        else:
            line = min(c.bad_lines)
            assert f"line {line}: " in mine[0] and c.bad_lines[line] in mine[0], (c.name, mine[0])
    assert "raise --max-bad-fraction" in final and "quarantine.jsonl" in final
    print(f"\n[bad kgclue via CLI] 2 calls, {len(KG_CASES)} files, {time.perf_counter() - t0:.1f}s")


# The CLI takes one --kb per call, so it gets every refused file and a spread of line-level faults
# (each file of the corpus goes through ingest_kb itself in test_kb_bad_file_plain_function).
KB_CLI = [c for c in KB_CASES if c.outcome == "error" or c.name.split("_")[0] in {"b01", "b06", "b07", "b10", "b12"}]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_bad_kb_files_through_the_cli(server, good_sample, tmp_path):
    """One CLI call per KB file (4 at a time): quarantined with counts conserved, or a clean error."""
    def one(c: Case):
        src = c.write(tmp_path)
        out = tmp_path / f"out-{Path(c.name).stem}"
        args = ["--data-dir", str(good_sample), "--out", str(out), "--kb", str(src)]
        if c.outcome != "error":
            args += ["--max-bad-fraction", "1"]
        return c, src, out, run_cli("flows.data_prep", args, server.env, timeout=300,
                                    log=tmp_path / f"{Path(c.name).stem}.log")

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, KB_CLI))
    for c, src, out, r in results:
        if c.outcome == "error":
            assert r.returncode == 1, (c.name, r.stderr[-3000:])
            check_stderr(r.stderr, "data-prep", failed=True)
            final = r.stderr[r.stderr.rindex("data-prep: error: "):]
            assert str(src) in final and all(f in final for f in c.error), (c.name, final)
            continue
        assert r.returncode == 0, (c.name, r.stderr[-3000:])
        check_stderr(r.stderr, "data-prep", failed=False)
        metrics = json.loads((out / "metrics.json").read_text("utf-8"))
        assert metrics["kb_protocol"] == "official"
        assert metrics["kb_quarantined"] == len(c.bad_lines), (c.name, metrics)
        assert metrics["kb_triples"] + metrics["kb_quarantined"] == c.lines, (c.name, metrics)
        _expect_quarantine(c, _quarantine_records(out / "kb" / "quarantine.jsonl"))
    assert len(KB_CLI) >= 10
    print(f"\n[bad KB via CLI] {len(KB_CLI)} calls, {time.perf_counter() - t0:.1f}s")


@pytest.mark.timeout(180)
def test_kgclue_pipeline_cli_bad_input_is_a_clean_error(server, good_sample, tmp_path):
    """The training pipeline's CLI fails the same clean way, in its data stage, before any Ray."""
    data = tmp_path / "kgclue"
    shutil.copytree(good_sample, data)
    gbk = next(c for c in KG_CASES if c.name.startswith("k31_"))
    (data / "train.json").write_bytes(gbk.data)
    ray_tmp = short_tmp("tfbad-")
    tag = uuid.uuid4().hex
    env = {**server.env, "RAY_TMPDIR": str(ray_tmp), TAG: tag}
    try:
        r = run_cli("flows.kgclue", ["--preset", "tiny", "--data-dir", str(data), "--out", str(tmp_path / "o")],
                    env, timeout=150, log=tmp_path / "cli.log")
    finally:
        survivors = wait_gone(tag, 10)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert r.returncode == 1, r.stderr[-3000:]
    check_stderr(r.stderr, "kgclue-pipeline", failed=True)
    final = r.stderr[r.stderr.rindex("kgclue-pipeline: error: "):]
    assert str(data / "train.json") in final and "iconv -f GB18030 -t UTF-8" in final, final
    assert survivors == [] and not (tmp_path / "o" / "ray").exists()


def test_stderr_checker_catches_library_tracebacks():
    lib = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    g()\n"
           "pyarrow.lib.ArrowInvalid: bad\n")
    ours = lib.replace("pyarrow.lib.ArrowInvalid", "tasks.kb.KbFormatError")
    with pytest.raises(AssertionError, match="outside our exception classes"):
        check_stderr(lib, "data-prep", failed=False)
    check_stderr(ours, "data-prep", failed=False)
    check_stderr("data-prep: error: x.txt: bad; fix: y\nmore of it\n", "data-prep", failed=True)
    with pytest.raises(AssertionError, match="printed a traceback"):  # a refusal: one clear error, no traceback
        check_stderr(ours + "data-prep: error: x.txt: bad; fix: y\n", "data-prep", failed=True)
    with pytest.raises(AssertionError, match="after our message"):
        check_stderr("data-prep: error: bad\n09:00:00.123 | INFO    | prefect - Stopping\n",
                     "data-prep", failed=True)
    with pytest.raises(AssertionError, match="one paragraph"):
        check_stderr("data-prep: error: bad\n\nother\n", "data-prep", failed=True)
    with pytest.raises(AssertionError, match="no 'data-prep: error:'"):
        check_stderr("09:00:00.123 | INFO    | prefect - x\n", "data-prep", failed=True)


def test_missing_inputs_are_clean_errors(tmp_path, capsys):
    from flows.data_prep import main
    from tasks.kgclue_data import prepare
    with pytest.raises(FileNotFoundError, match="no such KgCLUE file"):
        prepare({"train": tmp_path / "nope.json"}, tmp_path / "o")
    assert main(["--out", str(tmp_path), "--data-dir", str(tmp_path / "missing")]) == 2
    assert main(["--out", str(tmp_path), "--kb", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err
    assert "data_dir" in err and "kb" in err and "Traceback" not in err


# ============================================================================ 5. bad configs
BAD_CONFIGS = [  # (kwargs, words the message must contain)
    ({"num_workers": -1}, ["num_workers"]),
    ({"num_workers": 0}, ["num_workers"]),
    ({"steps": -5}, ["steps"]),
    ({"micro_batch": 0}, ["micro_batch"]),
    ({"global_batch": -8}, ["global_batch"]),
    ({"beam": 0}, ["beam"]),
    ({"zero_stage": 4}, ["zero_stage"]),
    ({"zero_stage": -1}, ["zero_stage"]),
    ({"max_failures": -1}, ["max_failures"]),
    ({"global_batch": 33, "num_workers": 2}, ["global_batch", "num_workers"]),
    ({"global_batch": 64, "num_workers": 2, "micro_batch": 16}, ["global_batch", "micro_batch", "num_workers"]),
    ({"num_workers": 1000}, ["num_workers"]),
    ({"data_dir": "/nonexistent/kgclue"}, ["data_dir"]),
    ({"kb": "/nonexistent/knowledge.txt"}, ["kb"]),
    ({"eval_file": "/nonexistent/dev.json"}, ["eval_file"]),
    ({"from_run": "/nonexistent/run"}, ["from_run"]),
    ({"ray_address": "127.0.0.1:1"}, ["ray_address", "127.0.0.1:1"]),
    ({"ray_address": "ray://127.0.0.1:1"}, ["ray_address", "127.0.0.1:1"]),
    ({"ray_address": "not-an-address"}, ["ray_address"]),
    ({"preset": "huge"}, ["preset"]),
    ({"colour": "red"}, ["colour"]),
]

CONFIG_SCRIPT = textwrap.dedent('''
    import json, os, sys, time
    import psutil
    import flows
    from pydantic import ValidationError
    from flows.kgclue import KgcluePipelineConfig, kgclue_pipeline, main
    cases, out = json.loads(sys.argv[1]), sys.argv[2]
    res = []
    for kw, words in cases:
        t = time.perf_counter()
        try:
            KgcluePipelineConfig(out=out, **kw)
            res.append({"kw": kw, "raised": False})
        except ValidationError as e:
            res.append({"kw": kw, "raised": True, "s": time.perf_counter() - t, "msg": str(e)})
    ok = KgcluePipelineConfig(out=out, global_batch=64, num_workers=2)
    t = time.perf_counter()
    rc = main(["--out", out, "--ray-address", "127.0.0.1:1"])
    cli_s = time.perf_counter() - t
    # a flow called with a bad parameter: Prefect validates it before any task run
    t = time.perf_counter()
    state = kgclue_pipeline(config={"out": out, "ray_address": "127.0.0.1:1"}, return_state=True)
    flow_s = time.perf_counter() - t
    import ray  # imported only now, to ask whether anything started it
    print("RESULT " + json.dumps({
        "cases": res, "micro_batch": ok.preset_values()["micro_batch"], "cli_rc": rc, "cli_s": cli_s,
        "flow_state": state.type.value, "flow_msg": state.message, "flow_s": flow_s,
        "flow_run_id": str(state.state_details.flow_run_id), "ray_initialized": ray.is_initialized(),
        "children": [" ".join(p.cmdline())[:100] for p in psutil.Process().children(recursive=True)
                     if "ray" in " ".join(p.cmdline())],
    }), flush=True)
''')


@pytest.mark.timeout(180)
def test_bad_configs_fail_fast_before_ray_and_tasks(server, tmp_path):
    cases = [(kw, words) for kw, words in BAD_CONFIGS]
    r = subprocess.run([PY, "-c", CONFIG_SCRIPT, json.dumps(cases), str(tmp_path / "out")], cwd=ROOT,
                       env=server.env, capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.split("RESULT ", 1)[1])
    for (kw, words), got in zip(cases, res["cases"]):
        assert got["raised"], f"{kw} was accepted"
        assert got["s"] < 1.0, (kw, got["s"])
        assert all(w in got["msg"] for w in words), (kw, got["msg"])
    assert res["micro_batch"] == 32  # global_batch 64 over 2 workers
    assert res["cli_rc"] == 2 and res["cli_s"] < 1.0 and "ray_address" in r.stderr
    assert res["flow_state"] == "FAILED" and "ray_address" in (res["flow_msg"] or ""), res
    assert res["flow_s"] < 60
    print(f"\n[bad flow parameter] state {res['flow_state']}: {res['flow_msg'][:300]}")
    assert res["ray_initialized"] is False and res["children"] == [], res  # no Ray job started
    assert task_runs_of(server, res["flow_run_id"]) == []  # failed before any task: nothing to retry
    from flows.data_prep import DataPrepConfig
    from pydantic import ValidationError
    for kw, word in (({"max_bad_fraction": -0.1}, "max_bad_fraction"), ({"kb_chunk_mib": 0}, "kb_chunk_mib"),
                     ({"kb_homonyms": -2}, "kb_homonyms")):
        with pytest.raises(ValidationError, match=word):
            DataPrepConfig(out=tmp_path, **kw)


def test_valid_addresses_are_not_refused(tmp_path):
    import socket

    from flows.kgclue import KgcluePipelineConfig, ray_host_port
    with socket.socket() as s:  # something that answers
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        for addr in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}", "auto"):
            assert KgcluePipelineConfig(out=tmp_path, ray_address=addr).ray_address == addr
    assert ray_host_port("ray://head.example:10001") == ("head.example", 10001)
    assert ray_host_port("[::1]:6379") == ("::1", 6379)


# ============================================================================ 6. services
DASHBOARD_SCRIPT = textwrap.dedent('''
    import json, sys
    import flows
    from tasks.train import ensure_ray
    import ray
    ensure_ray()
    print("READY " + json.dumps({"dashboard_url": ray.worker.get_dashboard_url()}), flush=True)
    sys.stdin.readline()
    ray.shutdown()
''')


def test_ensure_ray_defaults(monkeypatch):
    import ray

    from tasks import train
    from ray._private import ray_constants
    calls = []
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # restored afterwards, as is the constant
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", ray_constants.ENABLE_RAY_CLUSTER)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("TRIEFLOW_RAY_DASHBOARD", raising=False)
    train.ensure_ray()
    monkeypatch.setenv("TRIEFLOW_RAY_DASHBOARD", "1")
    train.ensure_ray()
    assert [c["include_dashboard"] for c in calls] == [False, True]
    assert all(c["dashboard_host"] == "127.0.0.1" for c in calls)
    assert ray_constants.ENABLE_RAY_CLUSTER is False  # a loopback node address for the local Ray


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ray_dashboard_listens_on_loopback_only(tmp_path):
    ray_tmp = short_tmp("tfdash-")
    tag = uuid.uuid4().hex
    env = proc_env(tmp_path / "ph", ray_tmp=ray_tmp, tag=tag, TRIEFLOW_RAY_DASHBOARD="1")
    proc = subprocess.Popen([PY, "-c", DASHBOARD_SCRIPT], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("READY "):
                break
        assert lines and lines[-1].startswith("READY "), "".join(lines)[-3000:]
        url = json.loads(lines[-1][6:])["dashboard_url"]
        port = int(url.rsplit(":", 1)[1])
        listening: dict[str, set] = {}
        dash = None
        t0 = time.monotonic()
        for _ in range(60):  # the dashboard (and its metrics port) bind a moment after ray.init returns
            listening = {}
            procs = {q.pid: q for p in tagged(tag) for q in [p, *_children(p)]}
            for p in procs.values():
                try:
                    name = " ".join(p.cmdline())
                    socks = {(c.laddr.ip, c.laddr.port) for c in p.net_connections("inet")
                             if c.status == psutil.CONN_LISTEN}
                except psutil.Error:
                    continue
                if "dashboard/dashboard.py" in name:
                    dash = socks
                listening[name[:90]] = socks
            agents = [k for k, v in listening.items() if "DashboardAgent" in k and v]
            if dash and any(pt == port for _, pt in dash) and (agents or time.monotonic() - t0 > 20):
                break
            time.sleep(0.5)
        assert dash, f"no dashboard process found: {list(listening)}"
        assert ("127.0.0.1", port) in dash and {ip for ip, _ in dash} == {"127.0.0.1"}, dash
        print("\n[ray listening sockets with the dashboard]\n" + "\n".join(
            f"  {sorted(v)}  {k}" for k, v in listening.items() if v))
        # not only the dashboard: every socket of this local Ray is on loopback
        everywhere = {ip for v in listening.values() for ip, _ in v}
        assert everywhere <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, listening
    finally:
        if proc.poll() is None:
            try:
                proc.stdin.write("\n")
                proc.stdin.flush()
                proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                kill_group(proc)
        survivors = wait_gone(tag, 30)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0
    assert survivors == [], survivors


CHECKPOINT_SCRIPT = textwrap.dedent('''
    import json, os, pickle, sys
    from pathlib import Path
    work = Path(sys.argv[1])
    import torch
    import deepspeed
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from models.seq2seq import Seq2SeqConfig
    from tasks.train import MODEL_CONFIG, MODEL_FILE, load_trained_model, safe_checkpoint_engine

    class Evil:  # unpickling this runs a shell command
        def __init__(self, marker):
            self.marker = marker
        def __reduce__(self):
            return (os.system, (f"touch {self.marker}",))

    calls = []
    real_load = torch.load
    def spy(*a, **kw):
        calls.append(kw.get("weights_only"))
        return real_load(*a, **kw)
    torch.load = spy

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2,
        "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30})
    engine.checkpoint_engine = safe_checkpoint_engine(TorchCheckpointEngine)()
    loss = engine(torch.randn(2, 4)).sum()
    engine.backward(loss)
    engine.step()
    ck = work / "ckpt"
    engine.save_checkpoint(str(ck), tag="state", client_state={"step": 1})
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    calls.clear()
    _, client = engine.load_checkpoint(str(ck), tag="state")
    out = {"client_step": client["step"], "load_calls": list(calls),
           "same": all(torch.equal(before[k], v) for k, v in engine.module.state_dict().items())}

    # a checkpoint whose model file is a malicious pickle: refused, the command never runs
    marker = work / "pwned-deepspeed"
    files = sorted(str(p.relative_to(ck)) for p in ck.rglob("*.pt"))
    out["files"] = files
    victim = ck / "state" / "mp_rank_00_model_states.pt"
    torch.save({"module": Evil(marker)}, victim)
    calls.clear()
    try:
        engine.load_checkpoint(str(ck), tag="state")
        out["deepspeed_refused"] = False
    except pickle.UnpicklingError as e:
        out["deepspeed_refused"] = "weights_only" in str(e).lower() or "unsupported global" in str(e).lower()
        out["deepspeed_error"] = str(e).splitlines()[0][:200]
    out["deepspeed_marker"] = marker.exists()
    out["evil_calls"] = list(calls)

    # tasks.train.load_trained_model on an exported model dir with a malicious model.pt
    mdir = work / "model"
    mdir.mkdir()
    (mdir / MODEL_CONFIG).write_text(json.dumps(Seq2SeqConfig.preset("tiny", vocab_size=50).to_dict()))
    marker2 = work / "pwned-model"
    torch.save({"w": Evil(marker2)}, mdir / MODEL_FILE)
    calls.clear()
    try:
        load_trained_model(mdir)
        out["model_refused"] = False
    except pickle.UnpicklingError:
        out["model_refused"] = True
    out["model_marker"] = marker2.exists()
    out["model_calls"] = list(calls)

    # control: the same file with weights_only=False does run the command (the pickle is real)
    marker3 = work / "pwned-control"
    torch.save({"w": Evil(marker3)}, work / "control.pt")
    real_load(work / "control.pt", weights_only=False)
    out["control_marker"] = marker3.exists()
    print("RESULT " + json.dumps(out), flush=True)
''')


@pytest.mark.timeout(240)
def test_checkpoints_load_weights_only_and_refuse_malicious_pickles(tmp_path):
    env = proc_env(tmp_path / "ph", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    r = subprocess.run([PY, "-c", CHECKPOINT_SCRIPT, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=220)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    res = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert res["client_step"] == 1 and res["same"], res
    assert res["load_calls"] and all(w is True for w in res["load_calls"]), res["load_calls"]
    assert res["deepspeed_refused"] is True and res["deepspeed_marker"] is False, res
    assert all(w is True for w in res["evil_calls"]), res
    assert res["model_refused"] is True and res["model_marker"] is False and res["model_calls"] == [True], res
    assert res["control_marker"] is True, "the crafted pickle is not malicious; the test proves nothing"
    print(f"\n[checkpoints] {len(res['load_calls'])} torch.load calls, all weights_only=True, for "
          f"{res['files']}; malicious file refused: {res['deepspeed_error']}")


# ============================================================================ 3. writer killed mid-write
WRITER_SCRIPT = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    from tasks.kb import ingest_kb
    from tasks.kgclue_data import discover, load_split, prepare
    from tasks.trie_build import build_trie_index
    from tasks.vocab import build_vocab
    out, data, kb = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    t0 = time.perf_counter()
    def stage(name):
        print(f"STAGE {name} {time.perf_counter() - t0:.3f}", flush=True)
    print("READY", flush=True)
    stage("data")
    m = prepare(discover(data), out / "data")
    stage("kb")
    ingest_kb(kb, out / "kb", chunk_bytes=1 << 20)
    stage("vocab")
    questions = load_split(out / "data", "train")["question"].to_pylist()
    build_vocab(questions, out / "kb", out / "vocab", m["inputs_sha256"])
    stage("trie")
    build_trie_index(out / "kb", out / "vocab", out / "trie", log=lambda s: None)
    stage("done")
''')


def write_big_kb(path: Path, n: int = 1_000_000) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"实体{i % 100_000}（义项{i % 7}）\t关系{i % 300}\t对象 {i}\n" for i in range(n))
    return path


STAGES = ("data", "kb", "vocab", "trie")


def _start_writer(out: Path, data: Path, kb: Path, env: dict) -> tuple[subprocess.Popen, float]:
    proc = subprocess.Popen([PY, "-c", WRITER_SCRIPT, str(out), str(data), str(kb)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = proc.stdout.readline()
    assert line.startswith("READY"), line + proc.stderr.read()
    return proc, time.perf_counter()


def _hashes(out: Path) -> dict[str, dict[str, str]]:
    from tasks.storage import read_manifest
    return {s: {n: e["sha256"] for n, e in read_manifest(out / s, verify_hashes=True)["files"].items()}
            for s in STAGES}


def _check_readers(out: Path, reference: dict) -> dict[str, str]:
    """Every reader either refuses (IncompleteOutput) or gets a complete, hash-verified output."""
    from tasks.kb import read_distinct
    from tasks.kgclue_data import load_split
    from tasks.storage import IncompleteOutput, is_tmp_name, read_manifest
    from tasks.trie_build import load_trie_index
    from tasks.vocab import load_vocab
    state = {}
    for s in STAGES:
        try:
            m = read_manifest(out / s, verify_hashes=True)
        except IncompleteOutput:
            state[s] = "incomplete"
            continue
        assert not any(is_tmp_name(Path(n).name) for n in m["files"]), m["files"]
        assert {n: e["sha256"] for n, e in m["files"].items()} == reference[s], f"{s}: differs from a clean run"
        state[s] = "complete"
    done = [state[s] == "complete" for s in STAGES]
    assert done == sorted(done, reverse=True), f"a later stage complete before an earlier one: {state}"
    for split in ("train", "dev", "test"):
        try:
            t = load_split(out / "data", split)
        except IncompleteOutput:
            assert state["data"] == "incomplete"
        else:
            assert state["data"] == "complete"
            assert t.num_rows == read_manifest(out / "data")["files"][f"{split}.parquet"]["rows"]
    for col in ("subject", "predicate", "disambiguation"):
        try:
            read_distinct(out / "kb", col)
        except IncompleteOutput:
            assert state["kb"] == "incomplete"
        else:
            assert state["kb"] == "complete"
    try:
        vocab = load_vocab(out / "vocab")
    except IncompleteOutput:
        assert state["vocab"] == "incomplete"
        vocab = None
    if vocab is not None:
        try:
            trie, index = load_trie_index(out / "trie", vocab)
        except IncompleteOutput:
            assert state["trie"] == "incomplete"
        else:
            assert state["trie"] == "complete" and trie.n_keys == read_manifest(out / "trie")["keys"]
    return state


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_writer_killed_mid_write_never_yields_a_partial_output(tmp_path):
    from tasks.sample import write_sample
    from tasks.storage import is_tmp_name
    data = write_sample(tmp_path / "kgclue", n_train=3000, n_dev=300, n_test=300)
    kb = write_big_kb(tmp_path / "knowledge.txt")
    env = proc_env(tmp_path / "ph")
    # a clean run: the reference output and the duration to spread the kills over
    ref = tmp_path / "reference"
    proc, t_ready = _start_writer(ref, data, kb, env)
    out, err = proc.communicate(timeout=300)
    duration = time.perf_counter() - t_ready
    assert proc.returncode == 0, err[-3000:]
    reference = _hashes(ref)
    stages = {ln.split()[1]: float(ln.split()[2]) for ln in out.splitlines() if ln.startswith("STAGE")}
    rng = random.Random(20261127)
    n_kills = 10
    delays = [duration * (k + rng.random()) / n_kills for k in range(n_kills)]  # one per eighth of the run
    outcomes = []
    for k, delay in enumerate(delays):
        target = tmp_path / f"kill{k}"
        proc, t_ready = _start_writer(target, data, kb, env)
        time.sleep(max(0.0, delay - (time.perf_counter() - t_ready)))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        reached = [ln.split()[1] for ln in proc.stdout.read().splitlines() if ln.startswith("STAGE")]
        state = _check_readers(target, reference)
        strays = sorted(str(p.relative_to(target)) for p in target.rglob("*") if is_tmp_name(p.name))
        outcomes.append({"delay_s": round(delay, 2), "stage": reached[-1] if reached else "-",
                         "complete": [s for s in STAGES if state[s] == "complete"], "stray_tmp": strays})
    print(f"\n[writer kills] clean run {duration:.1f}s, stages at {stages}")
    for o in outcomes:
        print(f"  {o}")
    # the kills must have hit the pipeline while it wrote (timing varies with the machine's load)
    assert sum(o["stage"] in ("kb", "vocab", "trie") for o in outcomes) >= 2, f"kills missed the writes: {outcomes}"
    # resume a killed directory per stage reached (every one that left a temp file among them):
    # it completes, equals the clean run, and no stray temp file remains
    resume = sorted({o["stage"]: k for k, o in enumerate(outcomes) if not o["stray_tmp"]}.values())
    resume += [k for k, o in enumerate(outcomes) if o["stray_tmp"]][:3]
    for k in sorted(set(resume)):
        target = tmp_path / f"kill{k}"
        proc, _ = _start_writer(target, data, kb, env)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        assert _check_readers(target, reference) == {s: "complete" for s in STAGES}
        strays = [str(p) for p in target.rglob("*") if is_tmp_name(p.name)]
        assert strays == [], strays


# ============================================================================ 2. driver / flow killed
STEP_RE = re.compile(r"train-seq2seq: step (\d+)/(\d+)")


def _steps(log: Path) -> list[int]:
    return [int(m.group(1)) for m in STEP_RE.finditer(log.read_text(errors="replace"))] if log.exists() else []


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_flow_killed_during_training_resumes_from_its_checkpoint(server, tmp_path):
    from tasks.sample import write_sample
    data = write_sample(tmp_path / "kgclue", n_train=300, n_dev=40, n_test=20)
    out = tmp_path / "run"
    ray_tmp = short_tmp("tfkill-")
    tag = uuid.uuid4().hex
    env = proc_env(tmp_path / "ph", api_url=server.api, ray_tmp=ray_tmp, tag=tag)
    cmd = [PY, "-m", "flows.kgclue", "--preset", "tiny", "--out", str(out), "--steps", "120",
           "--ranker-steps", "10", "--data-dir", str(data), "--beam", "2"]
    watched = ["data/train.parquet", "kb/kb.parquet", "vocab/vocab.json", "trie/s_label.npy"]
    log1, log2 = tmp_path / "first.log", tmp_path / "second.log"
    try:
        with open(log1, "wb") as f:
            first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 420
        ckpts: list[Path] = []
        while time.monotonic() < deadline:
            assert first.poll() is None, f"the first run ended ({first.returncode}) before it was killed:\n" \
                                         + log1.read_text(errors="replace")[-4000:]
            ckpts = sorted(c for c in (out / "ray").glob("*/checkpoint_*") if c.is_dir())
            steps = _steps(log1)
            # a checkpoint on disk, and training went on past it (so Ray has registered it)
            if ckpts and steps and steps[-1] >= 25:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("no checkpoint in time:\n" + log1.read_text(errors="replace")[-4000:])
        mtimes = {w: (out / w).stat().st_mtime_ns for w in watched}
        killed_at = _steps(log1)[-1]
        kill_group(first)
        t_kill = time.perf_counter()
        right_after = describe(tagged(tag))  # outside the process group: Ray's workers (own sessions)
        survivors = wait_gone(tag, 30)  # what the SIGKILLed driver's Ray left behind (killed by pid)
        gone_s = time.perf_counter() - t_kill
        assert not [s for s in survivors if "raylet" in s or "gcs_server" in s], survivors

        t0 = time.perf_counter()
        with open(log2, "wb") as f:
            second = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, timeout=600, start_new_session=True)
        resume_s = time.perf_counter() - t0
        text2 = log2.read_text(errors="replace")
        assert second.returncode == 0, text2[-5000:]
        steps2 = _steps(log2)
        print(f"\n[flow kill] killed after step {killed_at} (checkpoints: {[c.name for c in ckpts]}); "
              f"{len(right_after)} tagged process(es) outlived the group kill, all gone after {gone_s:.1f}s, "
              f"survivors killed by pid: {survivors}; second run steps {steps2[:3]}...{steps2[-1:]} "
              f"in {resume_s:.0f}s")
        assert steps2 and steps2[-1] == 120
        first_step = steps2[0]
        assert first_step > 5, f"the second run started from step 0: {steps2}"
        # the trainer logs its resume point (progress lines are one per poll, not every 5 steps)
        resumed = [int(m.group(1)) for m in re.finditer(r"resumed from the checkpoint at step (\d+)", text2)]
        assert len(resumed) == 1, text2[-5000:]
        resumed_from = resumed[0]  # checkpoints every 20 steps
        assert resumed_from % 20 == 0 and 20 <= resumed_from <= killed_at + 60 and first_step > resumed_from, steps2  # the log lags by <= one poll
        assert {w: (out / w).stat().st_mtime_ns for w in watched} == mtimes, "an upstream stage was recomputed"
        model = json.loads((out / "model" / "manifest.json").read_text("utf-8"))
        assert model["steps"] == 120
        assert json.loads((out / "metrics.json").read_text("utf-8"))["train_steps"] == 120
        runs = [r for r in flow_runs(server, "kgclue-pipeline")
                if r.parameters.get("config", {}).get("out") == str(out)]
        states = sorted(r.state.type.value for r in runs if r.state)
        assert states == ["COMPLETED", "RUNNING"], states  # the killed run stays Running (no heartbeat)
        assert wait_gone(tag, 30) == [], "the finished run left processes behind"
    finally:
        for p in tagged(tag):
            try:
                p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ============================================================================ 7. load
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_twenty_concurrent_flow_runs_against_one_server(server, tmp_path):
    from tasks.sample import write_sample
    data = write_sample(tmp_path / "kgclue", n_train=30, n_dev=10, n_test=10)
    outs = [tmp_path / f"out{i:02d}" for i in range(20)]
    t0 = time.perf_counter()
    procs = []
    for i, o in enumerate(outs):
        log = open(tmp_path / f"run{i:02d}.log", "wb")
        procs.append((subprocess.Popen([PY, "-m", "flows.data_prep", "--data-dir", str(data), "--out", str(o)],
                                       cwd=ROOT, env=server.env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True), log))
    try:
        for p, log in procs:
            p.wait(timeout=max(1, 240 - (time.perf_counter() - t0)))
            log.close()
    finally:
        for p, _ in procs:
            if p.poll() is None:
                kill_group(p)
    wall = time.perf_counter() - t0
    failed = [i for i, (p, _) in enumerate(procs) if p.returncode != 0]
    assert not failed, "\n".join((tmp_path / f"run{i:02d}.log").read_text(errors="replace")[-2000:] for i in failed)
    assert wall < 240
    for o in outs:
        m = json.loads((o / "metrics.json").read_text("utf-8"))
        assert m["rows"] == {"train": 30, "dev": 10, "test": 10} and m["quarantined"] == 0
    runs = {r.parameters["config"]["out"]: r for r in flow_runs(server, "data-prep")
            if r.parameters.get("config", {}).get("out") in {str(o) for o in outs}}
    assert len(runs) == 20 and all(r.state.is_completed() for r in runs.values()), \
        {k: r.state.type.value for k, r in runs.items()}
    print(f"\n[load] 20 concurrent data-prep runs against one server in {wall:.1f}s")
