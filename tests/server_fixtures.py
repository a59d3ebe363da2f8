"""Shared pieces for server tests: real servers on free loopback ports, served GMM and UNet models."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import grpc
import torch

from models.config import ModelEntry
from models.loading import LoadedModel
from samplers.denoiser import Denoiser
from samplers.gmm import gmm_image
from samplers.processes import DiscreteVP
from server import protogen
from server.app import start_server
from server.config import ServerConfig

pb, pb_grpc = protogen.load()
PROCESS = DiscreteVP.from_schedule()


def gmm_model(name="gmm", delay: float = 0.0, nan_label: int | None = None) -> LoadedModel:
    """The exact mixture as a served eps model; `delay` seconds per network call makes requests slow, and
    samples of class `nan_label` come out NaN (a poison request)."""
    exact = gmm_image().denoiser(PROCESS, "eps")

    def net(x_t, t, labels=None):
        if delay:
            time.sleep(delay)
        out = exact.net(x_t, t, labels)
        if nan_label is not None and labels is not None:
            out = torch.where((labels == nan_label).view(-1, 1, 1, 1), float("nan"), out)
        return out

    model = Denoiser(net, PROCESS, "eps", exact.shape, exact.num_classes)
    return LoadedModel(ModelEntry(name, Path("."), "diffusion", "dpmpp_2m", 10, 2.0), model)


def unet_model(tmp_path, name="unet") -> LoadedModel:
    from diffusers import DDPMScheduler, UNet2DModel

    from models.diffusers_loader import load_unet_denoiser

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, num_class_embeds=11)
    unet.save_pretrained(tmp_path / name / "unet", safe_serialization=True)
    DDPMScheduler().save_pretrained(tmp_path / name / "scheduler")
    model, _ = load_unet_denoiser(tmp_path / name, null_class=10)
    return LoadedModel(ModelEntry(name, tmp_path / name, "diffusion", "dpmpp_2m", 10, 2.0), model)


@contextmanager
def running_server(models: dict, warm_up: bool = True, **settings):
    config = replace(ServerConfig(port=0, metrics_port=None), **settings)
    server = start_server(models, config, warm_up=warm_up)
    try:
        yield server
    finally:
        server.stop(grace=2.0)


def stub_for(server, credentials=None):
    address = f"127.0.0.1:{server.port}"
    if credentials is None:
        channel = grpc.insecure_channel(address)
    else:
        channel = grpc.secure_channel(address, credentials, options=(("grpc.ssl_target_name_override", "localhost"),))
    return pb_grpc.DiffserveStub(channel), channel
