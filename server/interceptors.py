"""Server interceptors: gRPC metrics, bearer-token auth, and the one place domain errors become gRPC status
codes (including undecodable and oversized requests, refused before the servicer runs)."""

from __future__ import annotations

import hmac
import logging
import time

import grpc

from samplers.errors import InvalidRequest

from . import limits, metrics
from .errors import status_of

log = logging.getLogger("diffserve.server")
HEALTH = "/grpc.health.v1.Health/"
OPEN_METHODS = (HEALTH,)


def _wrap(handler, wrap_unary, wrap_stream, wrap_deserializer=None):
    if handler is None:
        return None
    deserialize = handler.request_deserializer
    if wrap_deserializer is not None and deserialize is not None:
        deserialize = wrap_deserializer(deserialize)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), deserialize,
                                                   handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream), deserialize,
                                                    handler.response_serializer)
    return handler


def _abort(context, err: BaseException):
    code, message = status_of(err)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("internal error", exc_info=err)
    context.abort(code, message)


class _Refused:
    """What a request that could not be decoded, or is over a size limit, becomes: the handler raises
    `error` inside the error mapping (a deserializer's own exception would leave as INTERNAL)."""

    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


def _checked(deserialize):
    message_name = getattr(getattr(deserialize, "__self__", None), "__name__", "request")

    def run(data: bytes):
        try:
            message = deserialize(data)
        except Exception:  # noqa: BLE001 - any decoding failure is the client's bytes
            return _Refused(InvalidRequest(f"request: {len(data)} bytes that do not decode as a {message_name}"))
        try:
            limits.check_message(message)
        except InvalidRequest as err:
            return _Refused(err)
        return message
    return run


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps domain exceptions to status codes (InvalidRequest -> INVALID_ARGUMENT, ...); see errors.STATUS.
    Requests are size-checked (limits.check_message) and undecodable ones refused before the servicer runs."""

    def intercept_service(self, continuation, handler_call_details):
        def unary(behavior):
            def run(request, context):
                try:
                    if isinstance(request, _Refused):
                        raise request.error
                    return behavior(request, context)
                except Exception as err:  # noqa: BLE001 - every error leaves as a status code
                    if isinstance(err, grpc.RpcError) or context.code() is not None:
                        raise
                    _abort(context, err)
            return run

        def stream(behavior):
            def run(request, context):
                try:
                    if isinstance(request, _Refused):
                        raise request.error
                    yield from behavior(request, context)
                except Exception as err:  # noqa: BLE001
                    if isinstance(err, grpc.RpcError) or context.code() is not None:
                        raise
                    _abort(context, err)
            return run

        return _wrap(continuation(handler_call_details), unary, stream, _checked)


def _code(context, default: grpc.StatusCode) -> grpc.StatusCode:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else default


class MetricsInterceptor(grpc.ServerInterceptor):
    """The standard gRPC server metrics: grpc_server_started_total, grpc_server_handled_total (by code) and
    grpc_server_handling_seconds, per service and method (registered methods only: labels stay bounded)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")

        def labels(kind: str):
            metrics.GRPC_STARTED.labels(kind, service, method).inc()
            return kind, service, method

        def done(names, start: float, code: grpc.StatusCode):
            metrics.GRPC_HANDLED.labels(*names, code.name).inc()
            metrics.GRPC_SECONDS.labels(*names).observe(time.monotonic() - start)

        def unary(behavior):
            def run(request, context):
                names, start, code = labels("unary"), time.monotonic(), grpc.StatusCode.UNKNOWN
                try:
                    response = behavior(request, context)
                    code = _code(context, grpc.StatusCode.OK)
                    return response
                except BaseException:
                    code = _code(context, grpc.StatusCode.UNKNOWN)
                    raise
                finally:
                    done(names, start, code)
            return run

        def stream(behavior):
            def run(request, context):
                names, start, code = labels("server_stream"), time.monotonic(), grpc.StatusCode.UNKNOWN
                try:
                    yield from behavior(request, context)
                    code = _code(context, grpc.StatusCode.OK)
                except GeneratorExit:  # the client went away mid-stream
                    code = grpc.StatusCode.CANCELLED
                    raise
                except BaseException:
                    code = _code(context, grpc.StatusCode.UNKNOWN)
                    raise
                finally:
                    done(names, start, code)
            return run

        return _wrap(handler, unary, stream)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every method except health checks.  Without the token,
    health answers only for `open_services` (the overall status): a per-model answer would tell anyone
    which model names exist, unless `model_health_public`."""

    def __init__(self, token: str, open_services: tuple[str, ...] = ("",), model_health_public: bool = False):
        self._expected = f"Bearer {token}".encode()
        self._open_services = frozenset(open_services)
        self._model_health_public = model_health_public

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = str(metadata.get("authorization", "")).encode()
        if hmac.compare_digest(given, self._expected):
            return continuation(handler_call_details)
        if method.startswith(OPEN_METHODS):
            handler = continuation(handler_call_details)
            return handler if self._model_health_public else self._overall_health_only(handler)

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        handler = continuation(handler_call_details)
        if handler is not None and handler.unary_stream:
            def deny_stream(request, context):
                deny(request, context)
                yield  # pragma: no cover
            return grpc.unary_stream_rpc_method_handler(deny_stream, handler.request_deserializer,
                                                        handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(deny, handler.request_deserializer if handler else None,
                                                   handler.response_serializer if handler else None)

    def _overall_health_only(self, handler):
        def check(request, context):
            if getattr(request, "service", "") not in self._open_services:
                context.abort(grpc.StatusCode.UNAUTHENTICATED,
                              "per-model health needs the bearer token; without it only the overall status "
                              "(service \"\") answers")

        def unary(behavior):
            def run(request, context):
                check(request, context)
                return behavior(request, context)
            return run

        def stream(behavior):
            def run(request, context):
                check(request, context)
                yield from behavior(request, context)
            return run

        return _wrap(handler, unary, stream)
