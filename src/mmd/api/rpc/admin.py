"""Reload: re-read the config without restarting running models."""

from __future__ import annotations

from typing import Any

from mmd.api.rpc.errors import Context, unary
from mmd.core.errors import ConfigError, InvalidConfig
from mmd.engine.engine import Engine
from mmd.engine.reload import reload_config
from mmd.v1 import mmd_pb2 as pb


class AdminService:
    engine: Engine

    @unary
    async def Reload(self, request: pb.ReloadRequest, context: Context) -> Any:
        try:
            diff = await reload_config(self.engine)
        except ConfigError as err:
            # The old config stays in force; the reason is the ConfigError's one line.
            raise InvalidConfig(str(err)) from None
        return pb.ReloadResponse(
            source=str(diff.source or ""),
            added=diff.added,
            removed=diff.removed,
            changed=diff.changed_entries(),
        )
