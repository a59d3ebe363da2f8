"""Issue 16 items 5-11 and 13: inputs bounded by size before any work, short error messages, NaN/Inf and
unknown values refused by name, garbage bytes, typed options, native PNGs, seeds always present, model
metadata, reflection v1, per-model health behind the token.  Real gRPC over loopback."""

import io
import math
import time

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from PIL import Image

from samplers.errors import InvalidRequest
from server import limits
from tests.server_fixtures import gmm_model, pb, running_server, stub_for


@pytest.fixture(scope="module")
def served():
    with running_server({"gmm": gmm_model()}, max_samples=16) as srv:
        stub, channel = stub_for(srv)
        yield srv, stub, channel
        channel.close()


def refused(call, request, **kwargs):
    with pytest.raises(grpc.RpcError) as info:
        out = call(request, timeout=30, **kwargs)
        if hasattr(out, "__next__"):
            list(out)
    return info.value.code(), info.value.details()


def test_a_huge_model_name_is_refused_with_a_short_message(served):
    _, stub, _ = served
    code, details = refused(stub.Generate, pb.GenerateRequest(model="m" * 1_000_000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("model:")
    assert len(details) < 300 and "1000000 characters" in details
    code, details = refused(stub.GetModel, pb.GetModelRequest(name="x" * 100_000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 300


def test_a_huge_prompt_is_refused_before_any_work(served):
    _, stub, _ = served
    start = time.monotonic()
    code, details = refused(stub.Generate, pb.GenerateRequest(model="gmm", prompt_text="a " * 4_000_000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("prompt_text: 8000000 bytes")
    assert time.monotonic() - start < 10
    code, details = refused(stub.Generate, pb.GenerateRequest(model="gmm", prompt_tokens=[1] * 100_000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("prompt_tokens: 100000 tokens")
    code, details = refused(stub.Generate, pb.GenerateRequest(model="gmm", seeds=list(range(200_000))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("seeds: 200000 seeds")
    request = pb.GenerateRequest(model="gmm")
    request.options.update({f"k{i}": i for i in range(100)})
    code, details = refused(stub.Generate, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("options: 100 keys")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_options_name_their_field(served, value):
    _, stub, _ = served
    request = pb.GenerateRequest(model="gmm", sampler="ddim", steps=2)
    request.options.update({"eta": value})
    code, details = refused(stub.Generate, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("options.eta:"), details
    search = pb.SearchSpec(method="best_of_n", budget_nfe=10, verifier="ink-mass")
    search.verifier_options.update({"target": value})
    code, details = refused(stub.Generate, pb.GenerateRequest(model="gmm", search=search))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("search.verifier_options.target:")
    search = pb.SearchSpec(method="best_of_n", budget_nfe=10, verifier="ink-mass")
    search.options.update({"n": value})
    code, details = refused(stub.Generate, pb.GenerateRequest(model="gmm", search=search))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("search.options.n:")


def test_unknown_format_and_search_method_are_named(served):
    _, stub, _ = served
    code, details = refused(stub.Generate, pb.GenerateRequest(model="gmm", steps=2, format=99))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("format:")
    search = pb.SearchSpec(method="no-such-search", budget_nfe=10)
    code, details = refused(stub.Generate, pb.GenerateRequest(model="gmm", search=search))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("search.method:"), details


def test_garbage_bytes_are_invalid_argument(served):
    _, _, channel = served
    for method in ("/diffserve.v1.Diffserve/Generate", "/diffserve.v1.Diffserve/GetModel"):
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(method)(b"\xff\xff\xff\xff\x0f", timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        list(channel.unary_stream("/diffserve.v1.Diffserve/GenerateStream")(b"\x0a\xff", timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_typed_options_work_like_the_struct(served):
    _, stub, _ = served
    struct = pb.GenerateRequest(model="gmm", sampler="ddim", steps=3, num_samples=2, format=pb.TENSOR)
    struct.options.update({"eta": 0.5})
    typed = pb.GenerateRequest(model="gmm", sampler="ddim", steps=3, num_samples=2, format=pb.TENSOR,
                               typed_options={"eta": pb.OptionValue(number_value=0.5)})
    a, b = stub.Generate(struct), stub.Generate(typed)
    assert [s.tensor.data for s in a.samples] == [s.tensor.data for s in b.samples]
    plain = stub.Generate(pb.GenerateRequest(model="gmm", sampler="ddim", steps=3, num_samples=2, format=pb.TENSOR))
    assert plain.samples[0].tensor.data != a.samples[0].tensor.data  # eta changed the samples
    both = pb.GenerateRequest(model="gmm", sampler="ddim", steps=3, typed_options={"eta": pb.OptionValue(int_value=1)})
    both.options.update({"eta": 0.5})
    code, details = refused(stub.Generate, both)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("typed_options.eta:")
    empty = pb.GenerateRequest(model="gmm", sampler="ddim", steps=3, typed_options={"eta": pb.OptionValue()})
    assert refused(stub.Generate, empty)[1].startswith("typed_options.eta: no value set")


def test_pngs_are_native_size_and_every_seed_is_present(served):
    server, stub, _ = served
    shape = server.engine.models["gmm"].loaded.model.shape  # (C, H, W)
    out = stub.Generate(pb.GenerateRequest(model="gmm", steps=2, num_samples=2, base_seed=0))
    assert Image.open(io.BytesIO(out.samples[0].png)).size == (shape[2], shape[1])
    assert [s.HasField("seed") for s in out.samples] == [True, True] and out.samples[0].seed == 0
    info = stub.GetModel(pb.GetModelRequest(name="gmm"))
    assert (info.layout, info.value_min, info.value_max) == ("CHW", -1.0, 1.0)


def test_png_scale_enlarges_on_request():
    import torch

    from server.convert import sample_protos
    from server.generation import GenerateResult

    result = GenerateResult(torch.zeros(1, 1, 8, 6), nfe=1, seeds=[0])
    native, big = sample_protos(pb, result, pb.PNG)[0], sample_protos(pb, result, pb.PNG, png_scale=4)[0]
    assert Image.open(io.BytesIO(native.png)).size == (6, 8)
    assert Image.open(io.BytesIO(big.png)).size == (24, 32)
    assert native.HasField("seed") and pb.Sample.FromString(native.SerializeToString()).HasField("seed")


def test_reflection_v1_and_v1alpha(served):
    _, _, channel = served
    for version in ("v1", "v1alpha"):
        call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                     request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="diffserve.v1.GenerateRequest")]
        listed, v1_file, api_file = list(call(iter(requests), timeout=10))
        names = {s.name for s in listed.list_services_response.service}
        assert {"diffserve.v1.Diffserve", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection"} <= names
        assert v1_file.HasField("file_descriptor_response") and api_file.HasField("file_descriptor_response")


def test_response_size_is_estimated_before_compute():
    limits.check_response_size("diffusion", (3, 256, 256), 6, "tensor", 1, 64 * 2**20)
    with pytest.raises(InvalidRequest, match=r"^num_samples: 6 tensor samples .* at most 5 per request.*SubmitJob"):
        limits.check_response_size("diffusion", (3, 256, 256), 6, "tensor", 1, 4 * 2**20)
    assert limits.response_bytes("diffusion", (3, 256, 256), 6, "tensor") > 6 * 3 * 256 * 256 * 4


def test_a_response_above_the_message_limit_is_refused_before_compute():
    with running_server({"gmm": gmm_model(delay=0.5)}, max_message_bytes=4096) as srv:
        stub, channel = stub_for(srv)
        start = time.monotonic()
        code, details = refused(stub.Generate, pb.GenerateRequest(model="gmm", steps=10, num_samples=200,
                                                                  format=pb.TENSOR))
        channel.close()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("num_samples:")
    assert time.monotonic() - start < 5  # refused, not computed (10 steps of 0.5 s)


def test_png_scale_over_grpc(served):
    server, stub, _ = served
    shape = server.engine.models["gmm"].loaded.model.shape
    out = stub.Generate(pb.GenerateRequest(model="gmm", steps=2, png_scale=3))
    assert Image.open(io.BytesIO(out.samples[0].png)).size == (3 * shape[2], 3 * shape[1])


def test_per_model_health_needs_the_token_when_auth_is_on():
    with running_server({"gmm": gmm_model()}, auth_token="s3cret") as srv:
        _, channel = stub_for(srv)
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest()).status == serving
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="gmm"))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token = (("authorization", "Bearer s3cret"),)
        assert health.Check(health_pb2.HealthCheckRequest(service="gmm"), metadata=token).status == serving
        channel.close()
    with running_server({"gmm": gmm_model()}, auth_token="s3cret", health_models_public=True) as srv:
        _, channel = stub_for(srv)
        health = health_pb2_grpc.HealthStub(channel)
        assert health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="gmm")).status == health_pb2.HealthCheckResponse.SERVING
        channel.close()


def test_struct_null_is_named(served):
    _, stub, _ = served
    request = pb.GenerateRequest(model="gmm", sampler="ddim", steps=2)
    request.options.fields["eta"].null_value = struct_pb2.NULL_VALUE
    code, details = refused(stub.Generate, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("options.eta: null")


class TinyTokenizer:
    """The parts of a tokenizer ModelInfo reads: its mask token and where it was loaded from."""

    mask_token, name_or_path = "<mask>", "/srv/secret/checkpoints/tiny-tokenizer/"


class TinyTextModel:
    """A time-agnostic masked model over 5 tokens + mask (fixed logits), with a tokenizer."""

    mask_id, vocab_size, length, forbidden = 5, 6, 8, (5,)
    tokenizer = TinyTokenizer()

    def logits(self, tokens, cond=None):
        import torch

        table = torch.randn(self.length, self.vocab_size, generator=torch.Generator().manual_seed(0))
        return table[: tokens.shape[1]].expand(tokens.shape[0], -1, -1).clone()

    def encode(self, text):
        return [int(c) % 5 for c in text if c.isdigit()]

    def decode(self, ids):
        return "".join(str(int(i)) for i in ids)


def test_model_info_of_a_text_model_names_its_mask_token_and_tokenizer():
    from pathlib import Path

    from models.config import ModelEntry
    from models.loading import LoadedModel

    loaded = LoadedModel(ModelEntry("tiny-text", Path("."), "masked", "first_hitting", 8), TinyTextModel())
    with running_server({"tiny-text": loaded}) as srv:
        stub, channel = stub_for(srv)
        info = stub.GetModel(pb.GetModelRequest(name="tiny-text"))
        channel.close()
    assert (info.layout, info.mask_token, info.mask_token_id) == ("L", "<mask>", 5)
    assert info.tokenizer == "tiny-tokenizer"  # the checkpoint's name, never its path
    assert list(info.shape) == [8] and info.vocab_size == 6
