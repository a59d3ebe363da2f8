"""A chat diffusion LM (LLaDA, tiny random weights) served as users run it: `prompt` + `max_new_tokens` over
gRPC and the command line give the texts of the library path, and bad requests name their field."""

import grpc
import pytest
import torch

from models.config import load_config
from models.diffusion_gemma import word_tokenizer
from models.llada import LLaDAConfig, LLaDAModel, save_llada
from models.loading import load_model
from samplers.calls import drive
from samplers.masked import masked_sampler_machine
from samplers.noise import SampleNoise
from server.cli import main as cli_main
from tests.server_fixtures import pb, running_server, stub_for

TINY = LLaDAConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=48, vocab_size=50,
                   embedding_size=50, max_sequence_length=64, rope_theta=10000.0, mask_token_id=49,
                   eos_token_id=1, pad_token_id=1)
OPTIONS = {"block_length": 8}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    model = LLaDAModel(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    save_llada(model.eval(), root / "llada")
    word_tokenizer(50).save_pretrained(root / "llada")
    (root / "models.toml").write_text('model_roots = ["."]\n[[models]]\nname = "tiny-llada"\ndirectory = "llada"\n'
                                      'kind = "masked"\ndefault_sampler = "llada"\ndefault_steps = 8\n')
    loaded = load_model(load_config(root / "models.toml")["tiny-llada"])
    with running_server({"tiny-llada": loaded}) as server:
        stub, channel = stub_for(server)
        yield server, stub, loaded, root / "models.toml"
        channel.close()


def _library(lm, prompt: str, new: int, seeds: list[int]) -> list[str]:
    ids = lm.chat_ids([{"role": "user", "content": prompt}])
    tokens = torch.tensor(ids + [lm.mask_id] * new).expand(len(seeds), -1).clone()
    out, _ = drive(masked_sampler_machine("llada", lm, tokens, steps=8, noise=SampleNoise(seeds), options=OPTIONS))
    return [lm.decode(row[len(ids):]) for row in out]


def test_chat_prompts_over_grpc_equal_the_library(served):
    _, stub, loaded, _ = served
    request = pb.GenerateRequest(model="tiny-llada", prompt="w1 w2", max_new_tokens=16, steps=8, num_samples=2,
                                 base_seed=3, format=pb.TEXT)
    request.typed_options["block_length"].int_value = 8
    out = stub.Generate(request)
    assert [s.text for s in out.samples] == _library(loaded.model, "w1 w2", 16, [3, 4])
    assert stub.GetModel(pb.GetModelRequest(name="tiny-llada")).takes_prompt


def test_the_command_line_sends_a_chat_prompt(served, capsys):
    server, _, loaded, config = served
    args = ["generate", "--config", str(config), "--model", "tiny-llada", "--prompt", "w1 w2", "--max-new-tokens",
            "16", "--steps", "8", "--n", "2", "--seed", "3", "--option", "block_length=8", "--quiet"]
    want = "\n\n".join(_library(loaded.model, "w1 w2", 16, [3, 4]))
    assert cli_main(args) == 0
    assert want in capsys.readouterr().out
    assert cli_main(args + ["--server", f"127.0.0.1:{server.port}"]) == 0
    assert want in capsys.readouterr().out


@pytest.mark.parametrize("fields,fragment", [
    (dict(prompt="w1", max_new_tokens=200), "max_new_tokens"),
    (dict(prompt="w1", prompt_text="w2"), "prompt"),
    (dict(prompt_text="w1", max_new_tokens=8), "max_new_tokens"),
])
def test_bad_chat_requests_name_the_field(served, fields, fragment):
    _, stub, _, _ = served
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(pb.GenerateRequest(model="tiny-llada", steps=8, **fields))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith(fragment)
