"""What every command shares: the exit-code contract, one-line errors and `--json` output.

Exit codes: 0 ok, 1 a requested threshold was not met, 2 bad input or failure. Errors are one
line on stderr; `--debug` shows the traceback instead.
"""

import json
import math
import sys
from collections.abc import Callable

import typer
from rich.markup import escape

from memtool.errors import MemtoolError
from memtool.progress import console

EXIT_OK, EXIT_THRESHOLD, EXIT_ERROR = 0, 1, 2

JsonOption = typer.Option(False, "--json", help="Print one JSON object on stdout.")
DebugOption = typer.Option(False, "--debug", help="Show tracebacks on errors.")


def _quiet_libraries() -> None:
    """transformers draws its own tqdm bars and logs warnings on stderr; memtool shows its own
    progress, and errors must stay one line. --debug keeps the libraries' output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def fail(message: str) -> None:
    # Escaped: messages name shapes like `[tokens]`, which rich would read as markup and drop.
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def one_line(text: str, limit: int = 400) -> str:
    """A library's multi-line message as one line (its first line alone may only announce the
    rest, as transformers' config validation does), cut at `limit` characters."""
    joined = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return joined if len(joined) <= limit else joined[: limit - 3] + "..."


def _strict_json(value):
    """`value` with NaN and infinities as null: strict JSON parsers (jq) reject bare NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(item) for item in value]
    return value


def run_command(
    action: Callable[[], tuple[dict, list[str]]],
    *,
    json_out: bool,
    debug: bool,
    render: Callable[[dict], None],
) -> None:
    """Run `action` (returns a payload and failed gates), print it, and exit by the contract."""
    if not debug:
        _quiet_libraries()
    try:
        payload, failures = action()
    except MemtoolError as exc:
        if debug:
            raise
        fail(str(exc))
        raise typer.Exit(EXIT_ERROR) from None
    except KeyboardInterrupt:
        fail("interrupted; nothing partial was left behind")
        raise typer.Exit(130) from None
    except Exception as exc:
        if debug:
            raise
        fail(f"{type(exc).__name__}: {one_line(str(exc))} (rerun with --debug for the traceback)")
        raise typer.Exit(EXIT_ERROR) from None
    if json_out:
        payload = {**payload, "thresholds": {"passed": not failures, "failures": failures}}
        sys.stdout.write(json.dumps(_strict_json(payload), default=str, allow_nan=False) + "\n")
    else:
        render(payload)
    for failure in failures:
        fail(f"threshold not met: {failure}")
    if failures:
        raise typer.Exit(EXIT_THRESHOLD)
