"""Domain exceptions shared by samplers, search and the server.

The server maps each of these to one gRPC status code in one place (server/errors.py);
nothing below the servicer imports grpc.
"""


QUOTE_CHARS = 100


def quote(value, limit: int = QUOTE_CHARS) -> str:
    """`value` for an error message: repr() of at most `limit` characters of it, with the full length
    when cut, so a 1 MB name comes back as ~120 bytes, never as the whole input."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


class DiffservError(Exception):
    """Base class of every error diffserve raises on purpose."""


class InvalidRequest(DiffservError, ValueError):
    """A request field is invalid; the message names the field (-> INVALID_ARGUMENT)."""


class UnknownModel(DiffservError, LookupError):
    """No served model has this name (-> NOT_FOUND)."""


class Cancelled(DiffservError):
    """The client cancelled the request or went away (-> CANCELLED)."""


class DeadlineExceeded(DiffservError):
    """The request's deadline passed before it finished (-> DEADLINE_EXCEEDED)."""


class BudgetExceeded(DiffservError):
    """A search tried to spend more network evaluations than its budget."""


class NonFiniteOutput(DiffservError):
    """A sample came out with NaN or Inf values (-> INTERNAL)."""
