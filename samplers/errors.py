"""Domain exceptions shared by samplers, search and the server.

The server maps each of these to one gRPC status code in one place (server/errors.py);
nothing below the servicer imports grpc.
"""


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
