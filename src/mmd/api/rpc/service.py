"""The gRPC servicer: proto in, engine call, proto out; domain errors mapped in one place."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from mmd.api.coalesce import coalesce_text
from mmd.api.rpc.admin import AdminService
from mmd.api.rpc.errors import Context, streaming, unary
from mmd.api.rpc.protos import (
    cores_proto,
    footprint_proto,
    health_proto,
    model_proto,
    placement_proto,
    registry_proto,
)
from mmd.api.rpc.watch import WatchService
from mmd.core import validate
from mmd.core.errors import WARNING_KEY, InvalidRequest
from mmd.core.planner import Plan
from mmd.engine.engine import AlreadyLoaded, Engine
from mmd.runtime.upstream import Final, InferParams
from mmd.v1 import mmd_pb2 as pb
from mmd.v1 import mmd_pb2_grpc

log = logging.getLogger("mmd.service")


def _keep_alive(request: pb.InferRequest | pb.EmbedRequest) -> float | None:
    seconds = request.keep_alive_seconds if request.HasField("keep_alive_seconds") else None
    return validate.keep_alive(seconds)


def _done_chunk(final: Final, mode: str) -> pb.InferChunk:
    return pb.InferChunk(
        done=pb.InferDone(
            mode=mode,
            finish_reason=final.finish_reason,
            prompt_tokens=final.prompt_tokens,
            completion_tokens=final.completion_tokens,
            timings=pb.Timings(
                queue_ms=final.queue_ms,
                load_ms=final.load_ms,
                first_token_ms=final.first_token_ms,
                total_ms=final.total_ms,
                prompt_tokens_per_second=final.prompt_per_second,
                generation_tokens_per_second=final.generation_per_second,
            ),
        )
    )


class ModelManager(WatchService, AdminService, mmd_pb2_grpc.ModelManagerServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Running handlers -> method name (grpc_errors keeps it), for interrupt_calls.
        self.calls: dict[asyncio.Task[Any], str] = {}

    @property
    def stopping(self) -> bool:
        """The daemon is shutting down: a handler cancelled now was cancelled by mmd."""
        return self.engine.closed

    @unary
    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> Any:
        return registry_proto(self.engine)

    @streaming
    async def LoadModel(self, request: pb.LoadModelRequest, context: Context) -> Any:
        model_id = validate.model_id(request.model_id)
        gpu_layers = request.gpu_layers if request.HasField("gpu_layers") else None
        validate.gpu_layers(gpu_layers)
        async with contextlib.aclosing(self.engine.load_stages(model_id, gpu_layers)) as stages:
            async for stage in stages:
                if stage.stage == "ready":  # with the model, which the stage does not carry
                    model = model_proto(self.engine, self.engine.entry(model_id))
                    yield pb.LoadProgress(stage="ready", message="", model=model)
                else:
                    yield pb.LoadProgress(stage=stage.stage, message=stage.message)

    @unary
    async def UnloadModel(self, request: pb.UnloadModelRequest, context: Context) -> Any:
        model_id = validate.model_id(request.model_id)
        timeout = validate.unload_timeout(request.timeout_seconds)
        timeout = timeout or self.engine.config.daemon.unload_timeout
        aborted = await self.engine.unload(model_id, request.force, timeout)
        entry = self.engine.entry(model_id)
        return pb.UnloadModelResponse(
            model=model_proto(self.engine, entry), aborted_requests=aborted
        )

    @streaming
    async def Infer(self, request: pb.InferRequest, context: Context) -> Any:
        model_id = validate.model_id(request.model_id)
        params = self._infer_params(request)
        keep_alive = _keep_alive(request)
        params, warning = await self.engine.prompt_mode(model_id, params, request.raw)
        if warning:
            await context.send_initial_metadata(((WARNING_KEY, warning),))
        async with (
            contextlib.aclosing(self.engine.infer(model_id, params, keep_alive)) as source,
            contextlib.aclosing(
                coalesce_text(source, self.engine.config.daemon.stream_interval)
            ) as items,
        ):
            async for item in items:
                if isinstance(item, Final):
                    yield _done_chunk(item, params.mode)
                else:
                    yield pb.InferChunk(text=item)

    def _infer_params(self, request: pb.InferRequest) -> InferParams:
        messages = tuple((m.role or "user", m.content) for m in request.messages)
        if not request.prompt.strip() and not any(c.strip() for _, c in messages):
            raise InvalidRequest("empty prompt")
        texts = [request.prompt, request.system, *(c for _, c in messages)]
        validate.size("prompt", validate.text_bytes(texts), self._prompt_limit)
        for role, _ in messages:
            if role not in validate.CHAT_ROLES:
                raise InvalidRequest(f"unknown message role {role!r}")
        return InferParams(
            prompt=request.prompt,
            messages=messages,
            system=request.system,
            max_tokens=validate.max_tokens(
                request.max_tokens if request.HasField("max_tokens") else None
            ),
            temperature=validate.temperature(
                request.temperature if request.HasField("temperature") else None
            ),
        )

    @property
    def _prompt_limit(self) -> int:
        return self.engine.config.daemon.max_prompt_bytes

    @unary
    async def Embed(self, request: pb.EmbedRequest, context: Context) -> Any:
        model_id = validate.model_id(request.model_id)
        inputs = list(request.input)
        if not inputs or not all(text.strip() for text in inputs):
            raise InvalidRequest("empty input")
        validate.size("input", validate.text_bytes(inputs), self._prompt_limit)
        keep_alive = _keep_alive(request)
        vectors, tokens = await self.engine.embed(model_id, inputs, keep_alive)
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=v) for v in vectors], prompt_tokens=tokens
        )

    @unary
    async def GetHealth(self, request: pb.GetHealthRequest, context: Context) -> Any:
        return health_proto(self.engine)

    @unary
    async def PlanLoad(self, request: pb.PlanLoadRequest, context: Context) -> Any:
        model_id = validate.model_id(request.model_id)
        gpu_layers = request.gpu_layers if request.HasField("gpu_layers") else None
        entry = self.engine.entry(model_id)
        total_layers = len(entry.footprint.layer_bytes)
        result = pb.LoadPlan(model_id=model_id, footprint=footprint_proto(entry.footprint))
        plan = await self.engine.plan_load(model_id, gpu_layers)
        cores: pb.Cores | None = None
        if isinstance(plan, AlreadyLoaded):
            result.already_loaded = True
            result.feasible = True
            result.placement.CopyFrom(placement_proto(plan.placement, total_layers))
            cores = cores_proto(entry.spec, entry.cores, entry.cores_reason)
        elif isinstance(plan, Plan):
            result.feasible = True
            result.placement.CopyFrom(placement_proto(plan.placement, total_layers))
            result.evict.extend(plan.evict)
            decision = self.engine.decide_cores(model_id, plan)
            if decision is not None:
                result.replace.extend(decision.replace)
            cores = cores_proto(
                entry.spec,
                decision.share if decision else None,
                decision.reason if decision else "",
            )
        else:
            result.reason = plan.reason
        if cores is not None:
            result.cores.CopyFrom(cores)
        return result
