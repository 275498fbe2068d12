"""The real cause of a failure, on one line, out of the layers Ray wraps around a worker's exception.

A failed Ray Data actor or Ray Train worker reaches the driver as ``RayTaskError`` / ``WorkerGroupError``
/ ``ControllerError`` whose texts end with Ray's own advice. The reason worth printing (and keeping in
the manifest) is the innermost exception. Nothing here imports Ray: the wrappers are recognised by their
attributes and module name.
"""

from __future__ import annotations

import re

_WRAPPED = ("cause", "_base_exc", "controller_failure")
"""Attributes holding the wrapped exception: RayTaskError / ActorDiedError, Ray Train's per-worker
wrapper, Ray Train's ControllerError (WorkerGroupError's ``worker_failures`` is handled apart)."""
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line_reason(error: BaseException, with_type: bool = False) -> str:
    """The innermost meaningful message of ``error`` on one line (``Type: message`` with ``with_type``).

    Ray wraps a task's or actor's exception in several layers whose texts end with Ray's advice; the
    reason is the innermost exception, or, where Ray kept only its text (a remote ``__cause__`` does not
    survive pickling), the root exception line of the remote traceback.
    """
    chain = error_chain(error)
    inner = chain[-1]
    if _from_ray(inner):
        root = next(filter(None, (_traceback_root(_text(e)) for e in reversed(chain))), None)
        if root:
            return _clip(root)
    message = _first_line(inner)
    if with_type or not message:
        message = f"{type(inner).__name__}: {message}".rstrip(": ")
    return _clip(message)


def error_chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it wraps, outermost first (``cause`` attributes, worker failures, ``__cause__``)."""
    chain = [error]
    while len(chain) < 32:
        inner = _wrapped(chain[-1])
        if inner is None or any(inner is seen for seen in chain):
            break
        chain.append(inner)
    return chain


def _wrapped(error: BaseException) -> BaseException | None:
    attributes = getattr(error, "__dict__", {})  # not getattr(): Ray's wrappers forward unknown names
    for name in _WRAPPED:
        if isinstance(attributes.get(name), BaseException):
            return attributes[name]
    failures = attributes.get("worker_failures")  # Ray Train's WorkerGroupError: {rank: exception}
    if isinstance(failures, dict) and failures:
        try:
            first = failures[min(failures)]  # the lowest rank's
        except TypeError:
            first = next(iter(failures.values()))
        if isinstance(first, BaseException):
            return first
    return error.__cause__


def _from_ray(error: BaseException) -> bool:
    return type(error).__module__.split(".")[0] == "ray"


def _text(error: BaseException) -> str:
    try:
        return _ANSI.sub("", str(error))
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the real error
        return ""


def _traceback_root(text: str) -> str | None:
    """The first exception line after a traceback's frames in ``text`` (the root of a chained traceback)."""
    in_frames = False
    for line in text.splitlines():
        if not line.strip():
            continue
        if line[:1].isspace():
            in_frames = in_frames or line.strip().startswith('File "')
            continue
        if in_frames:
            name, sep, message = line.strip().partition(": ")
            if re.fullmatch(r"[\w.]+", name):
                return f"{name.rsplit('.', 1)[-1]}{sep}{message.strip()}"
            in_frames = False
    return None


def _first_line(error: BaseException) -> str:
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        text = error.args[0].strip()  # KeyError's str() is the repr: keep only its first line
        return repr(text.splitlines()[0]) if text else ""
    lines = [line.strip() for line in _text(error).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _clip(text: str) -> str:
    return text if len(text) < 400 else text[:397] + "..."
