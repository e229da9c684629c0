"""Reload: re-read the config without restarting running models."""

from __future__ import annotations

from typing import Any

import grpc

from mmd.engine import Engine
from mmd.v1 import mmd_pb2 as pb

Context = grpc.aio.ServicerContext[Any, Any]


class AdminService:
    engine: Engine

    async def Reload(self, request: pb.ReloadRequest, context: Context) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Reload is not implemented yet")
