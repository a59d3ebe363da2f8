"""Server interceptors: bearer-token auth, and the one place domain errors become gRPC status codes."""

from __future__ import annotations

import hmac
import logging

import grpc

from .errors import status_of

log = logging.getLogger("diffserve.server")
OPEN_METHODS = ("/grpc.health.v1.Health/",)


def _wrap(handler, wrap_unary, wrap_stream):
    if handler is None:
        return None
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), handler.request_deserializer,
                                                   handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream), handler.request_deserializer,
                                                    handler.response_serializer)
    return handler


def _abort(context, err: BaseException):
    code, message = status_of(err)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("internal error", exc_info=err)
    context.abort(code, message)


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps domain exceptions to status codes (InvalidRequest -> INVALID_ARGUMENT, ...); see errors.STATUS."""

    def intercept_service(self, continuation, handler_call_details):
        def unary(behavior):
            def run(request, context):
                try:
                    return behavior(request, context)
                except Exception as err:  # noqa: BLE001 - every error leaves as a status code
                    if isinstance(err, grpc.RpcError) or context.code() is not None:
                        raise
                    _abort(context, err)
            return run

        def stream(behavior):
            def run(request, context):
                try:
                    yield from behavior(request, context)
                except Exception as err:  # noqa: BLE001
                    if isinstance(err, grpc.RpcError) or context.code() is not None:
                        raise
                    _abort(context, err)
            return run

        return _wrap(continuation(handler_call_details), unary, stream)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every method except health checks."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_METHODS):
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = str(metadata.get("authorization", "")).encode()
        if hmac.compare_digest(given, self._expected):
            return continuation(handler_call_details)

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
