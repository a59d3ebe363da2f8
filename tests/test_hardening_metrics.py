"""Issue 16 item 12: metrics an operator can alert on: every label set exists from start-up, refusals and
deadline expiries counted under their own status, buckets reaching minutes, the standard gRPC server
metrics per method and code."""

import time

import grpc
import pytest
from prometheus_client import REGISTRY

from tests.server_fixtures import gmm_model, pb, running_server, stub_for


def value(name: str, **labels) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def handled(method: str, code: str) -> float:
    return value("grpc_server_handled_total", grpc_type="unary", grpc_service="diffserve.v1.Diffserve",
                 grpc_method=method, grpc_code=code) or 0.0


def test_label_sets_exist_before_the_first_request():
    with running_server({"labels-gmm": gmm_model("labels-gmm")}):
        for status in ("ok", "invalid_argument", "resource_exhausted", "deadline_exceeded", "cancelled", "internal"):
            assert value("diffserve_requests_total", model="labels-gmm", sampler="unipc", status=status) == 0.0
        assert value("diffserve_nfe_total", model="labels-gmm", sampler="dpmpp_2m") == 0.0
        assert value("grpc_server_handled_total", grpc_type="unary", grpc_service="diffserve.v1.Diffserve",
                     grpc_method="Generate", grpc_code="INVALID_ARGUMENT") is not None
        assert value("grpc_server_started_total", grpc_type="server_stream", grpc_service="diffserve.v1.Diffserve",
                     grpc_method="GenerateStream") is not None


def test_buckets_reach_minutes():
    with running_server({"bucket-gmm": gmm_model("bucket-gmm")}) as srv:
        stub, channel = stub_for(srv)
        stub.Generate(pb.GenerateRequest(model="bucket-gmm", steps=2))
        channel.close()
    for name in ("diffserve_forward_seconds_bucket", "diffserve_request_seconds_bucket"):
        assert value(name, model="bucket-gmm", le="300.0") is not None, name
    assert value("grpc_server_handling_seconds_bucket", grpc_type="unary", grpc_service="diffserve.v1.Diffserve",
                 grpc_method="Generate", le="600.0") is not None


def test_grpc_server_metrics_count_every_rpc_by_code():
    with running_server({"grpc-gmm": gmm_model("grpc-gmm")}) as srv:
        stub, channel = stub_for(srv)
        ok, bad, missing = handled("Generate", "OK"), handled("Generate", "INVALID_ARGUMENT"), \
            handled("GetModel", "NOT_FOUND")
        stub.Generate(pb.GenerateRequest(model="grpc-gmm", steps=2))
        for request in (pb.GenerateRequest(model="grpc-gmm", sampler="nope"), pb.GenerateRequest(model="x" * 500)):
            with pytest.raises(grpc.RpcError):
                stub.Generate(request)
        with pytest.raises(grpc.RpcError):
            stub.GetModel(pb.GetModelRequest(name="nope"))
        channel.close()
    assert handled("Generate", "OK") == ok + 1
    assert handled("Generate", "INVALID_ARGUMENT") == bad + 2
    assert handled("GetModel", "NOT_FOUND") == missing + 1


def test_refusals_at_admission_are_counted_under_their_status():
    with running_server({"refuse-gmm": gmm_model("refuse-gmm")}, max_samples=4) as srv:
        stub, channel = stub_for(srv)
        with pytest.raises(grpc.RpcError):
            stub.Generate(pb.GenerateRequest(model="refuse-gmm", sampler="unipc", num_samples=5))
        channel.close()
    assert value("diffserve_requests_total", model="refuse-gmm", sampler="unipc", status="invalid_argument") == 1.0


def test_a_deadline_expiry_is_counted_as_deadline_exceeded():
    with running_server({"late-gmm": gmm_model("late-gmm", delay=0.2)}) as srv:
        stub, channel = stub_for(srv)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(pb.GenerateRequest(model="late-gmm", sampler="unipc", steps=50), timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(1.0)  # the engine settles the request within a step
        channel.close()
    assert value("diffserve_requests_total", model="late-gmm", sampler="unipc", status="deadline_exceeded") == 1.0
    assert value("diffserve_requests_total", model="late-gmm", sampler="unipc", status="cancelled") == 0.0
    assert value("diffserve_nfe_total", model="late-gmm", sampler="unipc") >= 1  # the work done before it expired
