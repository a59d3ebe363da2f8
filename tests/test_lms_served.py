"""Text diffusion LMs served as users run them: LLaDA, MDLM, BD3-LM and DiffusionGemma (tiny random weights,
checkpoints in their published layouts) take `prompt` + `max_new_tokens` over gRPC and the command line with
their family's default sampler, give the library path's texts cut at end-of-text, stream preview texts,
refuse what does not apply naming the field, and requests of different lengths share forward passes with
each sample's solo result."""

import threading

import grpc
import pytest
import torch

from models.config import load_config
from models.diffusion_gemma import DiffusionGemmaLM, random_diffusion_gemma, word_tokenizer
from models.llada import LLaDAConfig, LLaDAModel, save_llada
from models.loading import load_model
from models.mdlm_dit import DiTConfig, MDLMDiT, save_mdlm_dit
from samplers import REGISTRY
from samplers.block_diffusion import block_diffusion_machine
from samplers.calls import drive
from samplers.masked import masked_sampler_machine
from samplers.noise import SampleNoise
from server.cli import main as cli_main
from server.generation import GenerateRequest
from server.layout import concat, split
from server.requests import PLACEHOLDER
from tests import test_diffusion_gemma as small_window
from tests.server_fixtures import pb, running_server, stub_for

V = 40
LLADA = LLaDAConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=48, vocab_size=V,
                    embedding_size=V, max_sequence_length=64, rope_theta=10000.0, mask_token_id=V - 1,
                    eos_token_id=1, pad_token_id=0)
DIT = DiTConfig(vocab_size=V, model_length=64, hidden_dim=32, cond_dim=16, n_blocks=2, n_heads=4)
CANVAS = 8
MODELS = {"tiny-llada": "llada", "tiny-mdlm": "mdlm", "tiny-bd3lm": "bd3lm", "tiny-gemma": "diffusion_gemma"}
LLADA_OPTIONS = {"block_length": 8}


def _randomize(model, std: float):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model.eval()


def _plain_tokenizer():
    """The word tokenizer without a chat template: prompts go in as plain text."""
    tok = word_tokenizer(V)
    tok.chat_template = None
    return tok


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    save_llada(_randomize(LLaDAModel(LLADA), 0.3), root / "llada")
    word_tokenizer(V).save_pretrained(root / "llada")  # LLaDA-Instruct style: a chat template
    save_mdlm_dit(_randomize(MDLMDiT(DIT), 0.3), root / "mdlm")
    _plain_tokenizer().save_pretrained(root / "mdlm")
    save_mdlm_dit(_randomize(MDLMDiT(DiTConfig(**{**DIT.__dict__, "block_size": 4})), 0.3), root / "bd3lm",
                  model_type="bd3lm")
    _plain_tokenizer().save_pretrained(root / "bd3lm")
    gemma = random_diffusion_gemma(vocab_size=V, hidden_size=32, layers=2, canvas_length=CANVAS, std=0.5)
    gemma.save_pretrained(root / "diffusion_gemma")
    word_tokenizer(V).save_pretrained(root / "diffusion_gemma")
    # no default_sampler: each entry gets its family's (llada, first_hitting, block_first_hitting, block_refinement)
    entries = "".join(f'[[models]]\nname = "{name}"\ndirectory = "{d}"\nkind = '
                      f'"{"block_diffusion" if d == "diffusion_gemma" else "masked"}"\n'
                      f'{"default_steps = 8" if d in ("llada", "diffusion_gemma") else ""}\n'
                      for name, d in MODELS.items())
    (root / "models.toml").write_text('model_roots = ["."]\n' + entries)
    return root / "models.toml"


@pytest.fixture(scope="module")
def served(zoo):
    torch.set_num_threads(1)  # the step loops compute with their creator's threads: the tests' one (conftest)
    config = load_config(zoo)
    loaded = {name: load_model(entry) for name, entry in config.items()}
    with running_server(loaded) as server:
        stub, channel = stub_for(server)
        yield server, stub, loaded
        channel.close()


def _library(loaded, prompt: str, new: int, seeds: list[int], steps: int | None = None) -> list[str]:
    """The texts of the library path: the family's default sampler driven directly, no server."""
    lm, sampler = loaded.model, loaded.entry.default_sampler
    ids = lm.prompt_ids(prompt)
    noise = SampleNoise(seeds)
    if steps is None and not REGISTRY[sampler].one_step_per_mask:
        steps = loaded.entry.default_steps
    if loaded.kind == "block_diffusion":
        prompt_ids = torch.tensor([ids] * len(seeds))
        out, _ = drive(block_diffusion_machine(sampler, lm, prompt_ids, steps=steps, noise=noise,
                                               options={"gen_length": new}))
        return [lm.decode(row[len(ids):len(ids) + new]) for row in out]
    tokens = torch.tensor(ids + [lm.mask_id] * new).expand(len(seeds), -1).clone()
    options = LLADA_OPTIONS if sampler == "llada" else None
    out, _ = drive(masked_sampler_machine(sampler, lm, tokens, steps=steps, noise=noise, options=options))
    return [lm.decode(row[len(ids):]) for row in out]


def _request(name: str, prompt: str, new: int, seeds: list[int], **fields):
    request = pb.GenerateRequest(model=name, prompt=prompt, max_new_tokens=new, seeds=seeds, format=pb.TEXT,
                                 **fields)
    if name == "tiny-llada":
        request.typed_options["block_length"].int_value = 8
    return request


@pytest.mark.parametrize("name", list(MODELS))
def test_each_family_generates_over_grpc_with_its_default_sampler_and_equals_the_library(served, name):
    _, stub, loaded = served
    seeds = [3, 4, 5, 6]
    out = stub.Generate(_request(name, "w1 w2 w3", 16, seeds))
    assert out.sampler == {"tiny-llada": "llada", "tiny-mdlm": "first_hitting", "tiny-bd3lm": "block_first_hitting",
                           "tiny-gemma": "block_refinement"}[name]
    texts = [s.text for s in out.samples]
    assert texts == _library(loaded[name], "w1 w2 w3", 16, seeds)
    lm = loaded[name].model
    start = len(lm.prompt_ids("w1 w2 w3"))
    for sample, text in zip(out.samples, texts):  # the text stops at the first end-of-text token
        answer = list(sample.tokens)[start:start + 16]
        kept = answer[:answer.index(lm.eos_id)] if lm.eos_id in answer else answer
        assert text.split() == [f"w{t - 3}" for t in kept]
    info = stub.GetModel(pb.GetModelRequest(name=name))
    assert info.takes_prompt and info.default_sampler == out.sampler


def test_text_stops_at_end_of_text(served):
    """Some answer among these seeds holds EOS early: its text is the words before it, not 16 of them."""
    _, stub, loaded = served
    out = stub.Generate(_request("tiny-mdlm", "w1", 16, list(range(12))))
    lengths = [len(s.text.split()) for s in out.samples]
    assert min(lengths) < 16 and max(lengths) <= 16


def test_the_command_line_generates_in_process_and_over_the_server(served, zoo, capsys):
    server, _, loaded = served
    for name in ("tiny-gemma", "tiny-bd3lm"):
        args = ["generate", "--config", str(zoo), "--model", name, "--prompt", "w4 w5", "--max-new-tokens", "16",
                "--n", "2", "--seed", "7", "--quiet"]
        want = "\n\n".join(_library(loaded[name], "w4 w5", 16, [7, 8]))
        assert cli_main(args) == 0
        assert capsys.readouterr().out.strip() == want.strip()
        assert cli_main(args + ["--server", f"127.0.0.1:{server.port}"]) == 0
        assert capsys.readouterr().out.strip() == want.strip()


@pytest.mark.parametrize("name,fields,fragments", [
    ("tiny-gemma", dict(sampler="first_hitting"), ("sampler", "first_hitting", "tiny-gemma", "block_refinement")),
    ("tiny-mdlm", dict(sampler="block_refinement"), ("sampler", "block_refinement", "tiny-mdlm", "first_hitting")),
    ("tiny-mdlm", dict(sampler="dpmpp_2m"), ("sampler", "dpmpp_2m", "tiny-mdlm")),
    ("tiny-gemma", dict(max_new_tokens=5000), ("max_new_tokens",)),
    ("tiny-mdlm", dict(max_new_tokens=63), ("max_new_tokens", "64")),
    ("tiny-gemma", dict(prompt_text="w1"), ("prompt",)),
    ("tiny-gemma", dict(prompt=""), ("prompt", "tiny-gemma")),
    ("tiny-gemma", dict(negative_prompt="w2"), ("negative_prompt", "tiny-gemma")),
    ("tiny-gemma", dict(guidance=3.0), ("guidance", "tiny-gemma")),
    ("tiny-gemma", dict(height=32), ("height, width", "tiny-gemma")),
    ("tiny-gemma", dict(search=pb.SearchSpec(method="best_of_n", budget_nfe=8, verifier="x")), ("search",)),
])
def test_bad_lm_requests_name_the_field(served, name, fields, fragments):
    _, stub, _ = served
    request = pb.GenerateRequest(model=name, prompt="w1", max_new_tokens=16)
    for key, value in fields.items():
        if key == "search":
            request.search.CopyFrom(value)
        else:
            setattr(request, key, value)
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(fragments[0]) and all(f in info.value.details() for f in fragments)
    request = pb.GenerateRequest(model="tiny-gemma", prompt="w1", steps=2)
    request.typed_options["gen_length"].int_value = 8
    with pytest.raises(grpc.RpcError, match="max_new_tokens"):
        stub.Generate(request)


def _stream(stub, request):
    previews, result = [], None
    for event in stub.GenerateStream(request):
        if event.HasField("progress"):
            previews.append(list(event.progress.preview_texts))
        else:
            result = event.result
    return previews, [s.text for s in result.samples]


@pytest.mark.parametrize("name", ["tiny-llada", "tiny-mdlm"])
def test_masked_lm_streams_previews_whose_placeholders_only_decrease(served, name):
    _, stub, _ = served
    sampler = "llada" if name == "tiny-llada" else "mdlm"
    previews, texts = _stream(stub, _request(name, "w1 w2", 16, [1, 2], steps=8, sampler=sampler))
    assert len(previews) >= 8 and all(len(p) == 2 for p in previews)
    for k in range(2):
        holes = [p[k].count(PLACEHOLDER) for p in previews]
        assert holes[0] > 0 and holes[-1] == 0
        assert all(a >= b for a, b in zip(holes, holes[1:]))
        assert previews[-1][k] == texts[k]


def test_block_diffusion_streams_previews_ending_in_the_final_text(served):
    _, stub, _ = served
    request = _request("tiny-gemma", "w1 w2", 16, [1, 2], steps=4)
    request.typed_options["confidence_threshold"].number_value = 0.0
    previews, texts = _stream(stub, request)
    assert len(previews) == 2 * 4 + 1  # two canvases of four steps, then the settled text
    assert any(PLACEHOLDER in p[0] for p in previews[:4])
    assert previews[-1] == texts
    events = [e for e in stub.GenerateStream(request)]
    steps = [(e.progress.step, e.progress.steps, e.progress.nfe) for e in events if e.HasField("progress")]
    assert steps[-1] == steps[-2] and steps[-1][2] == events[-1].result.nfe  # the settled text adds no step or call
    every = _request("tiny-gemma", "w1 w2", 16, [1, 2], steps=4, preview_every=4)
    every.typed_options["confidence_threshold"].number_value = 0.0
    thinned, _ = _stream(stub, every)
    assert [bool(p) for p in thinned] == [False, False, False, True] * 2 + [True]


def _submit_together(engine, name, requests):
    """Both requests enter the step loop in the same round (the loop waits on its lock meanwhile)."""
    loop = engine.models[name].loop
    with loop._cv:
        tickets = [engine.submit(name, r) for r in requests]
    return [t.wait().result for t in tickets]


@pytest.mark.parametrize("name,requests", [
    ("tiny-llada", [GenerateRequest("llada", 8, seeds=(1, 2), n=2, prompt="w1 w2 w3 w4 w5", max_new_tokens=16,
                                    options=LLADA_OPTIONS),
                    GenerateRequest("llada", 12, seeds=(3,), prompt="w6", max_new_tokens=24, options=LLADA_OPTIONS)]),
    ("tiny-mdlm", [GenerateRequest("first_hitting", None, seeds=(1, 2), n=2, prompt="w1 w2 w3", max_new_tokens=12),
                   GenerateRequest("mdlm", 20, seeds=(3,), prompt="w4", max_new_tokens=30)]),
    ("tiny-bd3lm", [GenerateRequest("block_first_hitting", None, seeds=(5,), prompt="w1 w2", max_new_tokens=10),
                    GenerateRequest("block_first_hitting", None, seeds=(6,), prompt="w3 w4 w5", max_new_tokens=21)]),
    ("tiny-gemma", [GenerateRequest("block_refinement", 4, seeds=(1, 2), n=2, prompt="w1 w2 w3", max_new_tokens=16,
                                    options={"confidence_threshold": 0.0}),
                    GenerateRequest("discrete_ddim", 4, seeds=(3,), prompt="w9", max_new_tokens=8)]),
])
def test_requests_of_different_lengths_share_forwards_with_their_solo_results(served, name, requests):
    server, _, _ = served
    engine = server.engine
    loop = engine.models[name].loop
    solo, counts = [], []
    for request in requests:
        before = loop.forwards
        solo.append(engine.generate(name, request).result)
        counts.append(loop.forwards - before)
    before = loop.forwards
    together = _submit_together(engine, name, requests)
    shared = loop.forwards - before
    assert shared == max(counts) < sum(counts)
    for alone, joint in zip(solo, together):
        assert torch.equal(alone.samples, joint.samples) and alone.texts == joint.texts


def test_padded_logits_equal_the_unpadded_ones(served):
    """The exactness behind the test above: a short row in a padded batch gets its own logits (to float
    rounding), whatever the longer row holds."""
    _, _, loaded = served
    for name in ("tiny-llada", "tiny-mdlm", "tiny-bd3lm"):
        lm = loaded[name].model
        short, long = torch.randint(2, V - 1, (1, 11)), torch.randint(2, V - 1, (1, 29))
        calls = [lm.logits_call(short), lm.logits_call(long)]
        out = split(calls[0].network(*concat([c.args for c in calls])), [1, 1])
        torch.testing.assert_close(calls[0].complete(out[0]), lm.logits(short), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(calls[1].complete(out[1]), lm.logits(long), rtol=1e-5, atol=1e-5)
        assert calls[0].complete(out[0]).shape == (1, 11, V)
    gemma = loaded["tiny-gemma"].model
    contexts = [torch.randint(3, V, (1, 5)), torch.randint(3, V, (1, 13))]
    canvases = [torch.randint(0, V, (1, CANVAS)) for _ in contexts]
    sc, has = torch.zeros(1, CANVAS, V), torch.zeros(1, dtype=torch.bool)
    calls = [gemma.canvas_call(c, x, sc, has) for c, x in zip(contexts, canvases)]
    parts = split(calls[0].network(*concat([c.args for c in calls])), [1, 1])
    for context, canvas, part in zip(contexts, canvases, parts):
        torch.testing.assert_close(part, gemma.canvas_logits(context, canvas, sc, has), rtol=1e-4, atol=1e-4)


def test_a_stream_and_a_generate_of_different_lengths_run_side_by_side(served):
    """Different-length requests in flight at once over gRPC: each gets exactly the texts it gets alone."""
    _, stub, _ = served
    first, second = _request("tiny-llada", "w1", 16, [11], steps=8), _request("tiny-llada", "w2 w3 w4", 24, [12],
                                                                             steps=12)
    alone = [[s.text for s in stub.Generate(r).samples] for r in (first, second)]
    got = {}
    thread = threading.Thread(target=lambda: got.update(stream=_stream(stub, first)[1]))
    thread.start()
    got["unary"] = [s.text for s in stub.Generate(second).samples]
    thread.join(timeout=60)
    assert got["stream"] == alone[0] and got["unary"] == alone[1]


def test_left_padded_contexts_longer_than_the_sliding_window_keep_their_logits():
    """DiffusionGemma's sliding layers see the last W context tokens: left padding keeps them last (W = 8 here)."""
    C, VG = small_window.CANVAS, small_window.V
    lm = DiffusionGemmaLM(small_window.tiny_model(), small_window.tiny_tokenizer())
    assert lm.model.config.get_text_config().sliding_window == 8
    torch.manual_seed(3)
    contexts = [torch.randint(3, VG, (1, n)) for n in (3, 13, 30)]
    canvases = [torch.randint(0, VG, (1, C)) for _ in contexts]
    previous = [torch.randn(1, C, VG) for _ in contexts]
    has = torch.ones(1, dtype=torch.bool)
    calls = [lm.canvas_call(*args, has) for args in zip(contexts, canvases, previous)]
    parts = split(calls[0].network(*concat([c.args for c in calls])), [1, 1, 1])
    for part, args in zip(parts, zip(contexts, canvases, previous)):
        torch.testing.assert_close(part, lm.canvas_logits(*args, has), rtol=1e-4, atol=1e-4)
        assert torch.equal(part.argmax(-1), lm.canvas_logits(*args, has).argmax(-1))


def test_warm_up_is_a_short_answer_not_the_whole_sequence(served):
    """FHS over all of MDLM's positions would take model.length forwards; the warm-up answers 32 tokens."""
    from server.engine import warm_up_request

    _, _, loaded = served
    for name in ("tiny-llada", "tiny-mdlm", "tiny-bd3lm"):
        request = warm_up_request(loaded[name])
        assert request.prompt == "warm-up" and request.max_new_tokens == 32
    assert warm_up_request(loaded["tiny-gemma"]).max_new_tokens == CANVAS
