"""Build and run the gRPC server: servicer, health, reflection, interceptors, TLS, metrics, graceful stop."""

from __future__ import annotations

import logging
import signal
import socket
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from models.config import load_config
from models.loading import load_model

from . import metrics, protogen
from .config import ServerConfig
from .engine import Engine
from .errors import CannotStart
from .interceptors import ErrorInterceptor, MetricsInterceptor, TokenAuthInterceptor
from .reflection import enable_reflection
from .servicer import make_servicer

log = logging.getLogger("diffserve.server")
SERVICE = "diffserve.v1.Diffserve"


@dataclass
class RunningServer:
    server: grpc.Server
    engine: Engine
    health: health.HealthServicer
    port: int
    metrics_port: int | None

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE, *self.engine.models):
            ok = serving and (name in ("", SERVICE) or self.engine.ready(name))
            self.health.set(name, status if ok else health_pb2.HealthCheckResponse.NOT_SERVING)

    def begin_stop(self) -> None:
        """The first thing a stop does, whatever else is running: health NOT_SERVING, new requests UNAVAILABLE."""
        self.set_serving(False)
        self.engine.begin_shutdown()

    def stop(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new requests, let in-flight ones finish (up to grace)."""
        grace = self.engine.config.grace_seconds if grace is None else grace
        self.begin_stop()
        self.engine.drain(grace)
        self.server.stop(grace=1.0).wait()
        self.engine.close()


def _credentials(config: ServerConfig):
    if not config.tls_cert:
        return None
    key, cert = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
    ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def start_server(loaded_models: dict, config: ServerConfig, warm_up: bool = True, services=(),
                 resources: dict | None = None) -> RunningServer:
    """Start serving on config.host:config.port (0 = a free port); health is NOT_SERVING until warm.

    `services` are extra callables `add(grpc_server, engine) -> list of full service names` (for
    example the job queue's), registered beside the Diffserve service and listed by reflection."""
    pb, pb_grpc = protogen.load()
    engine = Engine(loaded_models, config, resources)
    interceptors = [MetricsInterceptor(), ErrorInterceptor()]
    if config.auth_token:
        interceptors.insert(1, TokenAuthInterceptor(config.auth_token, ("", SERVICE), config.health_models_public))
    options = [("grpc.max_receive_message_length", config.max_message_bytes),
               ("grpc.max_send_message_length", config.max_message_bytes),
               ("grpc.so_reuseport", 0)]  # a second server on this port fails instead of sharing it silently
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers + 4 * config.max_queue + 16),
                         interceptors=interceptors, options=options)
    pb_grpc.add_DiffserveServicer_to_server(make_servicer(pb, pb_grpc, engine), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [pb.DESCRIPTOR.services_by_name["Diffserve"].full_name, health.SERVICE_NAME]
    for add in services:
        names += add(server, engine)
    enable_reflection(names, server)
    _create_label_sets(loaded_models, names)
    address = f"{config.host}:{config.port}"
    creds = _credentials(config)
    try:
        port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        engine.close()
        raise CannotStart(f"port {config.port} on {config.host} is in use (another diffserve server? `make stop` "
                          f"stops the one `make serve` started), or {config.host} is not an address of this machine")
    metrics_port = None
    if config.metrics_port is not None:
        try:
            httpd, _ = metrics.serve_metrics(config.metrics_port, config.host)
        except OSError as err:
            engine.close()
            raise CannotStart(f"metrics port {config.metrics_port} on {config.host}: {err.strerror}") from None
        metrics_port = httpd.server_port
    server.start()
    running = RunningServer(server, engine, health_servicer, port, metrics_port)
    running.set_serving(False)
    if warm_up:
        engine.warm_up()
        running.set_serving(True)
    return running


def _create_label_sets(loaded_models: dict, services: list[str]) -> None:
    """Every metrics label set this server can report, at start-up (zeros), so rate() sees first errors."""
    from google.protobuf import descriptor_pool

    from samplers import REGISTRY
    from search.registry import SEARCHES

    served = {}
    for name, loaded in loaded_models.items():
        kinds = {loaded.kind, "flow"} if loaded.kind == "meanflow" else {loaded.kind}
        served[name] = [n for n, spec in {**REGISTRY, **SEARCHES}.items() if kinds & set(spec.kinds)]
    pool, methods = descriptor_pool.Default(), {}
    for service in services:
        try:
            descriptor = pool.FindServiceByName(service)
        except KeyError:
            continue
        methods[service] = [(m.name, "server_stream" if m.server_streaming else "unary")
                            for m in descriptor.methods if not m.client_streaming]  # as MetricsInterceptor
    metrics.create_label_sets(served, methods)


def apply_torch_threads(config: ServerConfig) -> None:
    """Set torch's intra-op threads from the config: compute threads and the batchers already run in
    parallel, and OpenMP threads spinning on shared cores slowed requests 20-90x in our measurements."""
    import torch

    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)


def load_models(config_path: str | Path, device: str = "cpu") -> dict:
    return {name: load_model(entry, device) for name, entry in load_config(config_path).items()}


def load_resources(config_path: str | Path, device: str = "cpu") -> dict:
    """What verifiers need, from the config's `[verifiers]` table (e.g. classifier-a = "digit-classifier-a")."""
    from models.classifiers import load_classifier
    from models.config import load_verifier_dirs

    return {name: load_classifier(directory, device) for name, directory in load_verifier_dirs(config_path).items()}


def check_port(host: str, port: int | None, what: str = "port") -> None:
    """Fail at once, before loading any model, when `port` is taken (a second `make serve`, say)."""
    if not port:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]  # "[::]" is IPv6
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no owner
            s.bind(address)
    except OSError as err:
        raise CannotStart(f"{what} {port} on {host}: {err.strerror or err} (another diffserve server? "
                          "`make stop` stops the one `make serve` started)") from None


def serve(config_path: str | Path, config: ServerConfig) -> None:
    """Load every configured model, serve until SIGTERM / SIGINT, then stop gracefully."""
    from .queue.runtime import QueueRuntime

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    check_port(config.host, config.port)
    check_port(config.host, config.metrics_port, "metrics port")
    apply_torch_threads(config)
    queue = QueueRuntime(config)  # a local Redis under run/redis unless config.redis_url names one
    try:
        models = load_models(config_path, config.device)
        running = start_server(models, config, services=[queue.service], resources=load_resources(config_path))
    except BaseException:
        queue.close()
        raise
    queue.start_worker(running.engine)
    log.info("serving %s on port %d (metrics on %s)", ", ".join(models), running.port, running.metrics_port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("stopping: draining in-flight requests for up to %.0f s", config.grace_seconds)
    running.begin_stop()  # health NOT_SERVING and new requests UNAVAILABLE now, before the worker winds down
    queue.stop_worker(config.grace_seconds)
    running.stop()
    queue.close()
