"""The gRPC servicer: proto in, engine call, proto out; domain errors mapped in one place."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Any

from mmd.coalesce import coalesce_text
from mmd.engine import Engine, LoadStage
from mmd.errors import WARNING_KEY, InvalidRequest
from mmd.footprint import has_chat_template
from mmd.grpc_errors import Context, streaming, unary
from mmd.planner import Plan
from mmd.protos import footprint_proto, health_proto, model_proto, placement_proto
from mmd.scheduler import State
from mmd.service_admin import AdminService
from mmd.service_watch import WatchService
from mmd.upstream import Final, InferParams
from mmd.v1 import mmd_pb2 as pb
from mmd.v1 import mmd_pb2_grpc

MAX_KEEP_ALIVE_S = 365 * 24 * 3600.0

log = logging.getLogger("mmd.service")


def _keep_alive(request: pb.InferRequest | pb.EmbedRequest) -> float | None:
    """The request's own keep-alive: None when unset, -1 for forever (any negative)."""
    if not request.HasField("keep_alive_seconds"):
        return None
    seconds = request.keep_alive_seconds
    if math.isnan(seconds) or seconds == math.inf or seconds > MAX_KEEP_ALIVE_S:
        raise InvalidRequest(f"keep_alive_seconds must be at most {MAX_KEEP_ALIVE_S:g}")
    return -1.0 if seconds < 0 else seconds


def _done_chunk(final: Final) -> pb.InferChunk:
    return pb.InferChunk(
        done=pb.InferDone(
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


def _require_id(model_id: str) -> str:
    if not model_id:
        raise InvalidRequest("model_id is empty")
    return model_id


class ModelManager(WatchService, AdminService, mmd_pb2_grpc.ModelManagerServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Running handlers -> method name (grpc_errors keeps it), for interrupt_calls.
        self.calls: dict[asyncio.Task[Any], str] = {}
        self._warned_no_template: set[str] = set()

    @property
    def stopping(self) -> bool:
        """The daemon is shutting down: a handler cancelled now was cancelled by mmd."""
        return self.engine.core.closed

    @unary
    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> Any:
        entries = self.engine.model_entries()
        return pb.ListModelsResponse(models=[model_proto(self.engine, e) for e in entries])

    @streaming
    async def LoadModel(self, request: pb.LoadModelRequest, context: Context) -> Any:
        model_id = _require_id(request.model_id)
        gpu_layers = request.gpu_layers if request.HasField("gpu_layers") else None
        if gpu_layers is not None and gpu_layers < 0:
            raise InvalidRequest(f"gpu_layers must be >= 0, got {gpu_layers}")
        plan = await self.engine.plan(model_id, gpu_layers)
        if isinstance(plan, Plan):
            evict = f"; evicting {', '.join(plan.evict)}" if plan.evict else ""
            yield pb.LoadProgress(stage="planning", message=f"{plan.placement.kind}{evict}")
        stages: asyncio.Queue[LoadStage | None] = asyncio.Queue()
        load = asyncio.create_task(self.engine.load(model_id, gpu_layers, stages.put_nowait))
        load.add_done_callback(lambda _: stages.put_nowait(None))
        try:
            while (stage := await stages.get()) is not None:
                if stage.stage != "ready":  # the final message below says it, with the model
                    yield pb.LoadProgress(stage=stage.stage, message=stage.message)
            await load
        finally:
            load.cancel()
        entry = self.engine.core.entry(model_id)
        yield pb.LoadProgress(stage="ready", message="", model=model_proto(self.engine, entry))

    @unary
    async def UnloadModel(self, request: pb.UnloadModelRequest, context: Context) -> Any:
        model_id = _require_id(request.model_id)
        if not 0 <= request.timeout_seconds < math.inf:
            raise InvalidRequest("timeout_seconds must be a finite number >= 0")
        timeout = request.timeout_seconds or self.engine.config.daemon.unload_timeout
        aborted = await self.engine.unload(model_id, request.force, timeout)
        entry = self.engine.core.entry(model_id)
        return pb.UnloadModelResponse(
            model=model_proto(self.engine, entry), aborted_requests=aborted
        )

    @streaming
    async def Infer(self, request: pb.InferRequest, context: Context) -> Any:
        model_id = _require_id(request.model_id)
        params = self._infer_params(request)
        keep_alive = _keep_alive(request)
        if params.is_chat:
            warning = await self._chat_template_warning(model_id)
            if warning:
                await context.send_initial_metadata(((WARNING_KEY, warning),))
        async with (
            contextlib.aclosing(self.engine.infer(model_id, params, keep_alive)) as source,
            contextlib.aclosing(
                coalesce_text(source, self.engine.config.daemon.stream_interval)
            ) as items,
        ):
            async for item in items:
                yield _done_chunk(item) if isinstance(item, Final) else pb.InferChunk(text=item)

    async def _chat_template_warning(self, model_id: str) -> str:
        """For a chat (messages, a system prompt) to a model whose GGUF file has no chat
        template: llama-server then formats it as ChatML, which such a model (the Gemma
        demo model, for one) may not know: it answered with ChatML's markers. Logged once
        per model; sent to each such client."""
        path = self.engine.core.entry(model_id).spec.path
        if await asyncio.to_thread(has_chat_template, path) is not False:
            return ""
        warning = (
            f"model {model_id!r} has no chat template in its GGUF file (no "
            "tokenizer.chat_template): llama-server formats the chat as ChatML, which the "
            "model may not follow; a plain prompt (no --system) is sent as it is"
        )
        if model_id not in self._warned_no_template:
            self._warned_no_template.add(model_id)
            log.warning("%s", warning)
        return warning

    def _check_size(self, what: str, size: int) -> None:
        limit = self.engine.config.daemon.max_prompt_bytes
        if size > limit:
            raise InvalidRequest(f"{what} is {size} bytes; the limit is {limit} (max_prompt_bytes)")

    def _infer_params(self, request: pb.InferRequest) -> InferParams:
        messages = tuple((m.role or "user", m.content) for m in request.messages)
        size = len(request.prompt.encode()) + sum(len(c.encode()) for _, c in messages)
        size += len(request.system.encode())
        if not request.prompt.strip() and not any(c.strip() for _, c in messages):
            raise InvalidRequest("empty prompt")
        self._check_size("prompt", size)
        for role, _ in messages:
            if role not in ("system", "user", "assistant"):
                raise InvalidRequest(f"unknown message role {role!r}")
        max_tokens = request.max_tokens if request.HasField("max_tokens") else None
        if max_tokens is not None and max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {max_tokens}")
        temperature = request.temperature if request.HasField("temperature") else None
        if temperature is not None and not 0.0 <= temperature <= 5.0:
            raise InvalidRequest(f"temperature must be between 0 and 5, got {temperature}")
        return InferParams(
            prompt=request.prompt,
            messages=messages,
            system=request.system,
            max_tokens=max_tokens,
            temperature=temperature,
        )

    @unary
    async def Embed(self, request: pb.EmbedRequest, context: Context) -> Any:
        model_id = _require_id(request.model_id)
        inputs = list(request.input)
        if not inputs or not all(text.strip() for text in inputs):
            raise InvalidRequest("empty input")
        self._check_size("input", sum(len(text.encode()) for text in inputs))
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
        model_id = _require_id(request.model_id)
        gpu_layers = request.gpu_layers if request.HasField("gpu_layers") else None
        entry = self.engine.core.entry(model_id)
        total_layers = len(entry.footprint.layer_bytes)
        result = pb.LoadPlan(model_id=model_id, footprint=footprint_proto(entry.footprint))
        if entry.state in (State.READY, State.LOADING):
            result.already_loaded = True
            result.feasible = True
            result.placement.CopyFrom(placement_proto(entry.placement, total_layers))
            return result
        plan = await self.engine.plan(model_id, gpu_layers)
        if isinstance(plan, Plan):
            result.feasible = True
            result.placement.CopyFrom(placement_proto(plan.placement, total_layers))
            result.evict.extend(plan.evict)
        else:
            result.reason = plan.reason
        return result
