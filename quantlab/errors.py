"""The two kinds of failure quantlab distinguishes.

A :class:`QuantlabError` is a user mistake: a missing folder, a file that is not ONNX, an unknown
calibrator name.  Its message says what was given, what is allowed and how to fix it, in one line;
the CLI prints it without a traceback and exits with status 2.  Anything else is a bug and keeps
its traceback.  Errors that onnx or ONNX Runtime raise on a user's model are user errors, reported by
:func:`stage` with the stage of the pipeline they happened in (prepare, statistics, quantize, check).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class QuantlabError(Exception):
    """A user error with a one-line message naming the problem and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def check(condition: bool, message: str) -> None:
    """Raise :class:`QuantlabError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise QuantlabError(message)


def raised_by_onnx(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside onnx or ONNX Runtime (its innermost frame, or its type)."""
    module = type(exc).__module__ or ""
    if module.split(".")[0] in ("onnx", "onnxruntime"):
        return True
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return False
    name = str(last.tb_frame.f_globals.get("__name__", ""))
    return name.split(".")[0] in ("onnx", "onnxruntime")


def node_in_traceback(exc: BaseException) -> str | None:
    """The name of the ONNX node a library was working on when it raised ``exc``, if its frames show one.

    ONNX Runtime's quantizer keeps the node it is quantizing in a local ``node`` (or ``self.node``), and
    the bias it is quantizing in an object with a ``node_name``; the innermost frame holding one of
    these names the culprit (outer frames may hold a loop's stale ``node``).
    """
    import onnx

    tb = exc.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        local = frame.f_locals
        for candidate in (local.get("node"), getattr(local.get("self"), "node", None)):
            if isinstance(candidate, onnx.NodeProto) and (candidate.name or candidate.output):
                return candidate.name or candidate.output[0]
        for value in local.values():
            name = getattr(value, "node_name", None)
            if isinstance(name, str) and name:
                return name
    return None


def describe(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, without ONNX Runtime's ``[ONNXRuntimeError] : 2 : CODE :`` prefix."""
    import re

    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    text = re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", text)
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def stage(name: str, what: str, fix: str) -> Iterator[None]:
    """Turn an error that onnx or ONNX Runtime raises on the user's model into a one-line :class:`QuantlabError`.

    The message reads ``<stage>: <what> failed (<the library's first line>): <fix>``, e.g.
    ``statistics: ONNX Runtime could not run 'model.onnx' on batch 0 (Fail: Non-zero status code returned while
    running Conv node. Name:'conv3' ...): check the data matches the model``.  Errors raised elsewhere (bugs in
    quantlab) keep their traceback; so do memory errors.
    """
    try:
        yield
    except QuantlabError:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        if not raised_by_onnx(exc):
            raise
        raise QuantlabError(f"{name}: {what} failed ({describe(exc)}): {fix}") from exc
