"""The gRPC servicer: translation between protos and the engine, a few lines per RPC."""

from __future__ import annotations

import queue
import threading
import time

from samplers.errors import InvalidRequest
from samplers.hooks import StepInfo

from . import convert
from .engine import Engine
from .images import grid_png
from .requests import TextStep


def _cancel_event(context) -> threading.Event:
    """Set when the RPC ends for any reason (client cancel, disconnect, deadline)."""
    event = threading.Event()
    context.add_callback(event.set)
    return event


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e8 else time.monotonic() + remaining


def output_format(pb, fmt: int) -> str | None:
    """The plan's name of a proto OutputFormat (None: the model's default); an unknown value is refused."""
    names = {pb.OUTPUT_FORMAT_UNSPECIFIED: None, pb.PNG: "png", pb.TENSOR: "tensor", pb.TEXT: "text"}
    if fmt not in names:
        raise InvalidRequest(f"format: unknown value {fmt}; expected PNG, TENSOR or TEXT")
    return names[fmt]


def make_servicer(pb, pb_grpc, engine: Engine):
    def progress_event(info, every: int, scale: int = 1):
        """A Progress event for a StepInfo (sampler step) or a SearchProgress (NFE of the budget)."""
        if isinstance(info, TextStep):  # a text model: its answers so far, every step (or every k-th)
            progress = pb.Progress(step=info.step + 1, steps=info.steps, nfe=info.nfe)
            if not every or (info.step + 1) % every == 0 or info.step + 1 == info.steps:
                progress.preview_texts.extend(info.previews())
            return pb.GenerateEvent(progress=progress)
        if isinstance(info, StepInfo):
            progress = pb.Progress(step=info.step + 1, steps=info.steps, nfe=info.nfe)
            preview = info.x0_hat if every and (info.step + 1) % every == 0 else None
        else:
            progress = pb.Progress(step=info.nfe, steps=info.budget_nfe, nfe=info.nfe)
            if info.best_rewards is not None and bool(info.best_rewards.isfinite().any()):
                progress.best_reward = float(info.best_rewards[info.best_rewards.isfinite()].max())
            preview = info.best_x0 if every else None
        if preview is not None and preview.ndim == 4:
            progress.preview_png = grid_png(preview.detach().float(), scale=max(1, scale))
        return pb.GenerateEvent(progress=progress)

    class DiffserveServicer(pb_grpc.DiffserveServicer):
        def _prepare(self, request):
            entry, _ = engine.model_info(request.model)
            return entry, convert.to_request(pb, request, entry), output_format(pb, request.format)

        def Generate(self, request, context):
            entry, req, output = self._prepare(request)
            out = engine.generate(entry.name, req, cancel=_cancel_event(context), deadline=_deadline(context),
                                  output=output, png_scale=request.png_scale)
            return convert.to_response(pb, entry.name, out, request.format, request.png_scale)

        def GenerateStream(self, request, context):
            """Progress events as the step loop reports them (previews are encoded here, not in the loop)."""
            entry, req, output = self._prepare(request)
            every = request.preview_every
            if every and every < engine.config.min_preview_every:
                raise InvalidRequest(f"preview_every: at least {engine.config.min_preview_every}")
            events: queue.Queue = queue.Queue()
            ticket = engine.submit(entry.name, req, on_step=events.put, on_done=lambda: events.put(None),
                                   cancel=_cancel_event(context), deadline=_deadline(context), output=output,
                                   png_scale=request.png_scale)
            try:
                while (info := events.get()) is not None:
                    yield progress_event(info, every, request.png_scale)
                result = ticket.wait()
            finally:
                ticket.abandon()  # a stream closed early still settles its request (cancelled within a step)
            yield pb.GenerateEvent(result=convert.to_response(pb, entry.name, result, request.format,
                                                              request.png_scale))

        def ListModels(self, request, context):
            return pb.ListModelsResponse(models=[convert.model_info(pb, *engine.model_info(name))
                                                 for name in engine.models])

        def GetModel(self, request, context):
            return convert.model_info(pb, *engine.model_info(request.name))

        def ListSamplers(self, request, context):
            return pb.ListSamplersResponse(samplers=convert.sampler_infos(pb, request.kind))

    return DiffserveServicer()
