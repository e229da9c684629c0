"""Reload: re-read the config without restarting running models."""

from __future__ import annotations

from typing import Any

import grpc

from mmd.engine import Engine
from mmd.errors import ERROR_KIND_KEY, ConfigError, MmdError
from mmd.grpc_errors import Context
from mmd.reload import reload_config
from mmd.v1 import mmd_pb2 as pb


class AdminService:
    engine: Engine

    async def Reload(self, request: pb.ReloadRequest, context: Context) -> Any:
        try:
            diff = await reload_config(self.engine)
        except ConfigError as err:
            # The old config stays in force; the reason is the ConfigError's one line.
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, str(err), ((ERROR_KIND_KEY, "invalid_config"),)
            )
        except MmdError as err:
            await context.abort(err.code, err.message, ((ERROR_KIND_KEY, err.kind),))
        return pb.ReloadResponse(
            source=str(diff.source or ""),
            added=diff.added,
            removed=diff.removed,
            changed=diff.changed_entries(),
        )
