"""The gRPC servicer: translation between protos and the engine, a few lines per RPC."""

from __future__ import annotations

import queue
import threading
import time

from samplers.hooks import StepInfo

from . import convert
from .engine import Engine
from .images import grid_png


def _cancel_event(context) -> threading.Event:
    """Set when the RPC ends for any reason (client cancel, disconnect, deadline)."""
    event = threading.Event()
    context.add_callback(event.set)
    return event


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e8 else time.monotonic() + remaining


def make_servicer(pb, pb_grpc, engine: Engine):
    class DiffserveServicer(pb_grpc.DiffserveServicer):
        def _prepare(self, request):
            entry, _ = engine.model_info(request.model)
            return entry, convert.to_request(pb, request, entry)

        def Generate(self, request, context):
            entry, req = self._prepare(request)
            out = engine.generate(entry.name, req, cancel=_cancel_event(context), deadline=_deadline(context))
            return convert.to_response(pb, entry.name, out, request.format)

        def GenerateStream(self, request, context):
            entry, req = self._prepare(request)
            events: queue.Queue = queue.Queue()
            every = request.preview_every
            if every and every < engine.config.min_preview_every:
                from samplers.errors import InvalidRequest
                raise InvalidRequest(f"preview_every: at least {engine.config.min_preview_every}")

            def on_step(info):
                if isinstance(info, StepInfo):
                    progress = pb.Progress(step=info.step + 1, steps=info.steps, nfe=info.nfe)
                    preview = info.x0_hat if every and (info.step + 1) % every == 0 else None
                else:  # a search's progress: NFE spent of the budget, best reward so far
                    progress = pb.Progress(step=info.nfe, steps=info.budget_nfe, nfe=info.nfe)
                    if info.best_rewards is not None and bool(info.best_rewards.isfinite().any()):
                        progress.best_reward = float(info.best_rewards[info.best_rewards.isfinite()].max())
                    preview = info.best_x0 if every else None
                if preview is not None and preview.ndim == 4:
                    progress.preview_png = grid_png(preview.detach().float())
                events.put(pb.GenerateEvent(progress=progress))

            outcome: dict = {}

            def run():
                try:
                    outcome["result"] = engine.generate(entry.name, req, on_step=on_step,
                                                        cancel=_cancel_event(context), deadline=_deadline(context))
                except BaseException as err:  # handed to the stream below
                    outcome["error"] = err
                events.put(None)

            threading.Thread(target=run, name="stream-request", daemon=True).start()
            while (event := events.get()) is not None:
                yield event
            if "error" in outcome:
                raise outcome["error"]
            yield pb.GenerateEvent(result=convert.to_response(pb, entry.name, outcome["result"], request.format))

        def ListModels(self, request, context):
            return pb.ListModelsResponse(models=[convert.model_info(pb, *engine.model_info(name))
                                                 for name in engine.models])

        def GetModel(self, request, context):
            return convert.model_info(pb, *engine.model_info(request.name))

        def ListSamplers(self, request, context):
            return pb.ListSamplersResponse(samplers=convert.sampler_infos(pb, request.kind))

    return DiffserveServicer()
