"""The gRPC floor of a request: a grpc.aio server with nothing behind it.

It answers Infer with ``--messages`` text messages and the closing one, as mmd
does for the same request, on a Unix socket. The
overhead benchmark times the same client call against it, so that the part of
mmd's added latency that is the transport itself shows as a floor of its own.

    python bench/grpc_floor.py SOCKET --messages N
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import grpc

from mmd.v1 import mmd_pb2 as pb
from mmd.v1 import mmd_pb2_grpc


class EmptyModelManager(mmd_pb2_grpc.ModelManagerServicer):
    def __init__(self, messages: int) -> None:
        self.messages = messages

    async def Infer(self, request: pb.InferRequest, context: Any) -> None:
        for _ in range(self.messages):
            await context.write(pb.InferChunk(text="x"))
        await context.write(pb.InferChunk(done=pb.InferDone(completion_tokens=self.messages)))


async def serve(socket: str, messages: int) -> None:
    server = grpc.aio.server()
    mmd_pb2_grpc.add_ModelManagerServicer_to_server(EmptyModelManager(messages), server)
    server.add_insecure_port(f"unix:{socket}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("socket")
    parser.add_argument("--messages", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.socket, args.messages))


if __name__ == "__main__":
    main()
