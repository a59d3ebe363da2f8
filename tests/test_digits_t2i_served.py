"""The bundled text-to-image model served as users run it: `diffserve generate --model digits-t2i --prompt "a bold
seven"` draws bold sevens by the held-out classifier B, in-process and through the server alike."""

import numpy as np
import pytest
import torch

from models.config import load_config
from models.loading import load_model
from server.cli import main as cli_main
from server.client import tensor_to_array
from tests.server_fixtures import pb, running_server, stub_for
from training.digits_data import train_split
from training.digits_fd import class_accuracy, get_classifier_b
from training.digits_t2i import data

N, SEVEN = 32, 7


def _bold_sevens(images: np.ndarray) -> tuple[float, float]:
    """(classifier-B accuracy for 7, fraction bolder than the median real 7) of (N, 1, 16, 16) images."""
    x8 = data.to_classifier(torch.as_tensor(images))
    labels = torch.full((len(x8),), SEVEN)
    x_train, y_train = train_split()
    bold = float((data.ink_quantile(x8, labels, x_train, y_train) > 0.5).float().mean())
    return class_accuracy(x8, labels, classifier=get_classifier_b()), bold


@pytest.fixture(scope="module")
def zoo_t2i():
    return load_model(load_config()["digits-t2i"])


def test_the_cli_draws_bold_sevens(tmp_path):
    out = tmp_path / "sevens.npy"
    assert cli_main(["generate", "--model", "digits-t2i", "--prompt", "a bold seven", "--n", str(N), "--seed", "0",
                     "--format", "npy", "--out", str(out), "--quiet"]) == 0
    images = np.load(out)
    assert images.shape == (N, 1, 16, 16)
    accuracy, bold = _bold_sevens(images)
    assert accuracy >= 0.9 and bold >= 0.8, (accuracy, bold)


def test_the_server_draws_the_same_bold_sevens(zoo_t2i, tmp_path):
    with running_server({"digits-t2i": zoo_t2i}) as server:
        stub, channel = stub_for(server)
        out = stub.Generate(pb.GenerateRequest(model="digits-t2i", prompt="a bold seven", num_samples=N, base_seed=0,
                                               format=pb.TENSOR))
        info = stub.GetModel(pb.GetModelRequest(name="digits-t2i"))
        channel.close()
    images = np.stack([tensor_to_array(s.tensor) for s in out.samples])
    assert info.takes_prompt and info.default_steps == 20 and info.guidance == 4.0 and out.nfe == 20
    accuracy, bold = _bold_sevens(images)
    assert accuracy >= 0.9 and bold >= 0.8, (accuracy, bold)
    assert cli_main(["generate", "--model", "digits-t2i", "--prompt", "a bold seven", "--n", str(N), "--seed", "0",
                     "--format", "npy", "--out", str(tmp_path / "cli.npy"), "--quiet"]) == 0
    assert float(np.abs(np.load(tmp_path / "cli.npy") - images).max()) < 1e-4
