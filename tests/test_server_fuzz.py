"""Random and malformed requests at every RPC: only well-formed status codes, no hang, no crash."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server_fixtures import gmm_model, pb, running_server, stub_for

# The documented refusals of a bad request; INTERNAL would be a server bug (issue 16 item 7).
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED,
           grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def fuzz_server():
    with running_server({"gmm": gmm_model()}, max_steps=50, max_samples=8) as srv:
        stub, channel = stub_for(srv)
        yield srv, stub, channel
        channel.close()


numbers = st.one_of(st.integers(-10, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                    st.text(max_size=5))
requests = st.builds(
    pb.GenerateRequest,
    model=st.sampled_from(["gmm", "", "nope", "gmm\x00", "../etc/passwd"]),
    sampler=st.sampled_from(["", "euler", "ddim", "evodiff", "unipc", "ddpm", "meanflow", "first_hitting", "??"]),
    steps=st.integers(0, 2**32 - 1),
    num_samples=st.integers(0, 20),
    seeds=st.lists(st.integers(0, 2**64 - 1), max_size=4),
    base_seed=st.integers(0, 2**64 - 1),
    format=st.integers(0, 5),
    preview_every=st.integers(0, 3),
    grid=st.sampled_from(["", "karras", "uniform_t", "bogus"]),
    prompt_tokens=st.lists(st.integers(-5, 100), max_size=3),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests, options=st.dictionaries(st.sampled_from(["eta", "order", "beta", "x"]), numbers,
                                                 max_size=2),
       typed=st.dictionaries(st.sampled_from(["eta", "order", "s_churn"]),
                             st.one_of(st.floats().map(lambda x: pb.OptionValue(number_value=x)),
                                       st.integers(-2**63, 2**63 - 1).map(lambda x: pb.OptionValue(int_value=x)),
                                       st.just(pb.OptionValue())), max_size=2),
       label=st.one_of(st.none(), st.integers(-2**31, 2**31 - 1)),
       guidance=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)), stream=st.booleans())
def test_random_requests_get_well_formed_answers(fuzz_server, request, options, typed, label, guidance, stream):
    server, stub, channel = fuzz_server
    request.options.update(options)
    for key, value in typed.items():
        request.typed_options[key].CopyFrom(value)
    if label is not None:
        request.class_label = label
    if guidance is not None:
        request.guidance = guidance
    try:
        if stream:
            events = list(stub.GenerateStream(request, timeout=30))
            assert events[-1].HasField("result")
        else:
            stub.Generate(request, timeout=30)
    except grpc.RpcError as err:
        assert err.code() in ALLOWED, (err.code(), err.details())
        assert err.details() and "Traceback" not in err.details()
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(max_size=30), kind=st.text(max_size=10), garbage=st.binary(max_size=64))
def test_lookups_and_garbage_bytes(fuzz_server, name, kind, garbage):
    server, stub, channel = fuzz_server
    try:
        stub.GetModel(pb.GetModelRequest(name=name), timeout=10)
    except grpc.RpcError as err:
        assert err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    stub.ListSamplers(pb.ListSamplersRequest(kind=kind), timeout=10)
    raw = channel.unary_unary("/diffserve.v1.Diffserve/Generate")
    try:
        raw(garbage, timeout=10)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.code()
