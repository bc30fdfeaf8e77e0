"""User-facing errors.

Anything a user can cause (a bad flag, a missing file, a budget that cannot be met) raises
:class:`CapllmError` with one line that says what is wrong and what to do. The CLI prints that
line and exits with status 2 (3 for :class:`OutOfMemory`); library callers get an ordinary exception.
"""


class CapllmError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class OutOfMemory(CapllmError):
    """Ran out of host or GPU memory in a step that can say which knob to turn."""

    exit_code = 3


def is_out_of_memory(exc: BaseException) -> bool:
    """True for MemoryError, torch.OutOfMemoryError and CUDA/CPU allocator "out of memory" errors."""
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def check(condition: bool, message: str) -> None:
    """Raise :class:`CapllmError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise CapllmError(message)
