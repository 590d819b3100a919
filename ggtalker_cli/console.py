"""Human output on stderr (rich), machine output on stdout (--json), one progress style everywhere.

Stdout stays clean for shell pipelines: only the final JSON summary (with --json) or a raw
stream (synth --stream) is ever written there.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

err = Console(stderr=True, highlight=False)
_state = {"quiet": False, "json": False}


def configure(*, quiet: bool, json_mode: bool) -> None:
    _state["quiet"] = quiet
    _state["json"] = json_mode


def info(message: str) -> None:
    """A human line on stderr, silenced by --quiet."""
    if not _state["quiet"]:
        err.print(message)


def warn(message: str) -> None:
    """Warnings are shown even with --quiet: they change what the artifact means. One line each
    (no wrapping at the terminal width), so logs can be grepped."""
    err.print(f"[yellow]warning:[/yellow] {message}", soft_wrap=True)


def emit(summary: dict[str, Any]) -> None:
    """The command's result: JSON on stdout with --json, a short table on stderr otherwise."""
    if _state["json"]:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
        sys.stdout.flush()
    elif not _state["quiet"]:
        for key, value in summary.items():
            err.print(f"  [bold]{key}[/bold]: {value}")


class _StatusColumn(TextColumn):
    """Free text a stage updates as it goes (loss, fps, ...); empty when it sets none."""

    def __init__(self) -> None:
        super().__init__("")

    def render(self, task):  # type: ignore[override]
        return Text(str(task.fields.get("status", "")))


@contextmanager
def progress() -> Iterator[Progress]:
    """A rich progress display with ETA on stderr; disabled (but still usable) under --quiet."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        _StatusColumn(),
    )
    with Progress(*columns, console=err, disable=_state["quiet"], transient=False) as bar:
        yield bar
