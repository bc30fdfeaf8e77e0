"""User-facing errors.

Anything a user can cause (a bad flag, a missing file, a budget that cannot be met) raises
:class:`CapllmError` with one line that says what is wrong and what to do. The CLI prints that
line and exits with status 2; library callers get an ordinary exception.
"""


class CapllmError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`CapllmError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise CapllmError(message)
