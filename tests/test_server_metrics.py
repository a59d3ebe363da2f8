"""A real Prometheus server (Debian's package, started on loopback) scrapes /metrics and sees our series."""

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from tests.server_fixtures import gmm_model, pb, running_server, stub_for

PROMETHEUS = shutil.which("prometheus")
SERIES = ["diffserve_requests_total", "diffserve_request_seconds_bucket", "diffserve_queue_wait_seconds_count",
          "diffserve_compute_seconds_sum", "diffserve_batch_size_bucket", "diffserve_forward_seconds_count",
          "diffserve_nfe_total", "diffserve_inflight_requests", "diffserve_queued_requests", "diffserve_model_ready",
          "process_resident_memory_bytes", "grpc_server_started_total", "grpc_server_handled_total",
          "grpc_server_handling_seconds_bucket"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expr)}"
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)["data"]["result"]


def test_prometheus_scrapes_our_series(tmp_path):
    if PROMETHEUS is None:
        if os.environ.get("DIFFSERVE_REQUIRE_SERVICES"):
            pytest.fail("prometheus is not installed but DIFFSERVE_REQUIRE_SERVICES is set")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    with running_server({"gmm": gmm_model()}, metrics_port=0) as srv:
        stub, channel = stub_for(srv)
        stub.Generate(pb.GenerateRequest(model="gmm", sampler="unipc", steps=5, num_samples=2))
        channel.close()
        port = _free_port()
        (tmp_path / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: diffserve\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{srv.metrics_port}']\n")
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline, missing = time.monotonic() + 60, SERIES
            while missing and time.monotonic() < deadline:
                time.sleep(1)
                try:
                    missing = [s for s in SERIES if not _query(port, s)]
                except OSError:
                    continue
            assert not missing, f"series not scraped: {missing}"
            ok = _query(port, 'diffserve_requests_total{model="gmm",sampler="unipc",status="ok"}')
            assert float(ok[0]["value"][1]) >= 1
            assert float(_query(port, 'diffserve_nfe_total{model="gmm",sampler="unipc"}')[0]["value"][1]) >= 5
            assert _query(port, 'up{job="diffserve"}')[0]["value"][1] == "1"
            ok = _query(port, 'grpc_server_handled_total{grpc_method="Generate",grpc_code="OK"}')
            assert float(ok[0]["value"][1]) >= 1
        finally:
            proc.terminate()
            proc.wait(10)
