"""One exception type for every expected failure, each with a documented exit code.

Stages raise `GGError` with a single line that names the file and the fix; the CLI prints that
line and exits with the code. Anything else is a bug and exits with INTERNAL. The table of codes
is mirrored in docs/errors.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    INTERNAL = 1  # a bug: an exception we did not expect
    USAGE = 2  # bad flag or argument (Typer's own code for usage errors)
    INPUT_MISSING = 3  # input path does not exist or cannot be read
    INPUT_INVALID = 4  # input exists but its content cannot be used (corrupt, no face, too short...)
    OUTPUT = 5  # output exists (without --force), is not writable, or the disk is full
    ASSET = 6  # a model file could not be resolved
    ARTIFACT = 7  # a clip/prior/avatar folder of another format version, truncated or unsafe
    RESOURCE = 8  # device missing, out of memory
    DIVERGED = 9  # training produced NaN/inf
    INTERRUPTED = 130  # SIGINT/SIGTERM: state saved, run `--resume`


class GGError(Exception):
    """An expected failure with a one-line, user-facing message and an exit code."""

    def __init__(self, message: str, code: Exit = Exit.INPUT_INVALID):
        super().__init__(message)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return self.message


@contextmanager
def out_of_memory(what: str, fix: str) -> Iterator[None]:
    """CUDA out-of-memory as one RESOURCE line: what was running and which setting to lower.

    The allocator's own message is a paragraph about fragmentation that never names the preset
    setting that caused it, and a traceback reads like a bug rather than a size to change.
    """
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        raise GGError(f"CUDA out of memory {what}; {fix}", Exit.RESOURCE) from e
