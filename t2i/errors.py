"""User-facing errors: the message names the thing that is wrong and how to fix it."""


class T2IError(RuntimeError):
    """Base class for errors a user can cause (bad path, bad override, bad data, mismatch)."""


class ConfigError(T2IError):
    """A configuration that cannot work, e.g. no model selected."""


def reason(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (at most ``limit`` characters), for one-line errors that quote a
    library's exception (torch's unpickling errors run to a dozen lines)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if len(first) > limit:
        first = first[: limit - 3] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
