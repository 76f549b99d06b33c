"""The two kinds of failure quantlab distinguishes.

A :class:`QuantlabError` is a user mistake: a missing folder, a file that is not ONNX, an unknown
calibrator name.  Its message says what was given, what is allowed and how to fix it, in one line;
the CLI prints it without a traceback and exits with status 2.  Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class QuantlabError(Exception):
    """A user error with a one-line message naming the problem and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def check(condition: bool, message: str) -> None:
    """Raise :class:`QuantlabError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise QuantlabError(message)
