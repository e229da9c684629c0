"""Watch and Logs: the daemon's event stream and the models' llama-server logs."""

from __future__ import annotations

from typing import Any

import grpc

from mmd.engine import Engine
from mmd.v1 import mmd_pb2 as pb

Context = grpc.aio.ServicerContext[Any, Any]


class WatchService:
    engine: Engine

    async def Watch(self, request: pb.WatchRequest, context: Context) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Watch is not implemented yet")
        yield pb.Event()

    async def Logs(self, request: pb.LogsRequest, context: Context) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Logs is not implemented yet")
        yield pb.LogLines()
