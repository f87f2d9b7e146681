"""The flows' command lines: one way to validate parameters, run, and report errors.

Exit codes: 0 done, 1 an input or parameter problem the user must fix (our own message, naming
the file, line, reason and fix, is the last stderr output), 2 invalid parameters.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Callable

from pydantic import AfterValidator

from tasks.kb import KbFormatError
from tasks.kgclue_data import DataQualityError
from tasks.storage import IncompleteOutput


def json_object(text: str) -> dict:
    """An argparse ``type``: a JSON object (option maps such as ``--attention-options``)."""
    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg} at column {e.colno}): {text!r}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"rel_key\": true}}', got {text!r}")
    return v


def check_attention_options(kind: str, options: dict) -> None:
    """Refuse a kind's options before Ray starts, in the kind's own words: the kind is built once
    at a toy size (a typo or a wrong type raises there, not in a training worker)."""
    from models.attention import make_attention
    try:
        make_attention(kind, d_model=8, n_head=2, **options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"attention_options for {kind!r}: {e}") from None


def _dir(v: Path | None) -> Path | None:
    if v is not None and not v.is_dir():
        raise ValueError(f"{v} is not a directory (give KgCLUE's datasets/ folder, or omit it to use a "
                         f"generated sample)")
    return v


def _file(v: Path | None) -> Path | None:
    if v is not None and not v.is_file():
        raise ValueError(f"{v}: no such file")
    return v


# Config field types shared by the flows: a path that must exist when given.
DataDir = Annotated[Path | None, AfterValidator(_dir)]
InputFile = Annotated[Path | None, AfterValidator(_file)]

# Errors that mean "fix the input or the parameters": the CLI prints their message (which names
# the file, line, reason and fix) and exits 1, instead of a traceback. Anything else is a bug
# and keeps its traceback.
KNOWN_ERRORS: tuple[type[BaseException], ...] = (DataQualityError, KbFormatError, IncompleteOutput, FileNotFoundError)


class RefusalFilter:
    """A logging filter: a task or flow run that fails on an expected refusal (one of
    :data:`KNOWN_ERRORS`: bad data, a bad KB, an incomplete input) is logged as one line, not
    with its traceback; the CLI then prints the refusal itself as the last message. Anything
    else keeps its traceback."""

    def filter(self, record) -> bool:  # noqa: A003 - logging's name
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and isinstance(exc, KNOWN_ERRORS):
            record.exc_info, record.exc_text = None, None
            record.msg = f"{record.getMessage().splitlines()[0][:300]} (refused: see the error below)"
            record.args = ()
        return True


def install_refusal_filter() -> None:
    """Attach :class:`RefusalFilter` to the handlers that print Prefect's run logs."""
    import logging
    flt = RefusalFilter()
    for name in ("prefect", "prefect.task_runs", "prefect.flow_runs", "prefect.flow_engine", "prefect.task_engine"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, RefusalFilter) for f in lg.filters):
            lg.addFilter(flt)
        for h in lg.handlers:
            if not any(isinstance(f, RefusalFilter) for f in h.filters):
                h.addFilter(flt)


def _quiet_prefect_shutdown() -> None:
    """Send pending Prefect logs, then stop the temporary API server now rather than at exit.

    Prefect stops its ephemeral server in an ``atexit`` hook that logs "Stopping temporary
    server"; doing it here lets the CLI's own error message be the last thing on stderr.
    """
    with contextlib.suppress(Exception):
        from prefect.logging.handlers import APILogWorker
        APILogWorker.drain_all(timeout=5)  # every queued service (logs, events) sends now
    with contextlib.suppress(Exception):
        from prefect.server.api.server import SubprocessASGIServer
        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()


def cli_error(prog: str, err: BaseException) -> int:
    """Print ``err`` as the last, one-paragraph stderr output of the CLI; return exit code 1."""
    _quiet_prefect_shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
    return 1


def run_cli(prog: str, parse: Callable[[list[str] | None], Any], run: Callable[[Any], dict],
            argv: list[str] | None, summary: Callable[[Any, dict], str],
            cleanup: Callable[[], None] | None = None) -> int:
    """Parse ``argv`` into a config (exit 2 if invalid), run the flow, print ``summary``."""
    from pydantic import ValidationError
    try:
        cfg = parse(argv)
    except ValidationError as e:
        print(f"{prog}: invalid parameters:\n{e}", file=sys.stderr)
        return 2
    install_refusal_filter()
    try:
        metrics = run(cfg)
    except KNOWN_ERRORS as e:
        if cleanup:
            cleanup()
        return cli_error(prog, e)
    print(summary(cfg, metrics))
    return 0
