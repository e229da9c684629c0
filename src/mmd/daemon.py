"""``mmd``: the daemon's entry point and lifecycle.

start-up: config -> llama-server candidates -> lock -> socket -> engine -> serve -> READY=1.
shutdown (SIGTERM/SIGINT, a second one forces exit): STOPPING=1 -> stop accepting ->
drain running requests -> stop every child -> remove the socket.
``Daemon`` holds one run: startup, run (until a stop signal) and shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mmd import __version__
from mmd.api.lines import JsonLinesServer
from mmd.api.metrics import start_metrics
from mmd.api.rpc.errors import interrupt_calls
from mmd.api.rpc.service import ModelManager
from mmd.config.discovery import load_registry, log_discovery
from mmd.config.settings import Config, check_socket_path
from mmd.core.errors import ConfigError, MmdError, RuntimeFailed
from mmd.core.sources import summary
from mmd.engine.engine import Engine
from mmd.engine.reload import reload_config
from mmd.host import paths, rundir
from mmd.host.memory import MemoryProbe
from mmd.host.sdnotify import Notifier, run_watchdog
from mmd.runtime.check import LlamaRuntime, VerdictCache, choose, failure_line
from mmd.runtime.gguf import footprint_for
from mmd.runtime.server import llama_server_candidates, watch_children_with_pidfd
from mmd.v1 import mmd_pb2, mmd_pb2_grpc

if TYPE_CHECKING:
    from mmd.api.web.server import HttpFront

log = logging.getLogger("mmd")

# Calls the transport holds before mmd's handlers pick them up (see Daemon._start_grpc).
_MAX_PENDING_CALLS = 1_000_000
# At shutdown, how often Daemon.shutdown looks whether the drain is over.
_CLOSED_POLL_S = 0.02

EXIT_CONFIG = 2
EXIT_IN_USE = 3
EXIT_RUNTIME = 4


class StartupError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _take_lock(sock: Path) -> IO[bytes]:
    """An exclusive lock next to the socket: grpcio would silently take over a live path."""
    lock_path = sock.with_name(sock.name + ".lock")
    try:
        # O_NOFOLLOW: in a shared (sticky) directory the name may be another user's link.
        fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    except OSError as err:
        raise StartupError(
            f"cannot open the lock {lock_path}: {err.strerror}", EXIT_CONFIG
        ) from None
    handle = os.fdopen(fd, "ab")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StartupError(
            f"another mmd is already serving {sock} (lock {lock_path} is held)", EXIT_IN_USE
        ) from None
    try:
        sock.unlink()  # stale: its daemon is gone, since we hold the lock
        log.info(
            "took over %s: the daemon that left it is gone (lock %s was free)", sock, lock_path
        )
    except FileNotFoundError:
        pass
    except OSError as err:
        handle.close()
        raise StartupError(f"cannot remove the stale {sock}: {err.strerror}", EXIT_CONFIG) from None
    return handle


class Daemon:
    """One run of the daemon: ``startup`` makes what serving needs and keeps it here,
    ``run`` waits for a stop signal, ``shutdown`` undoes what startup made, in order."""

    def __init__(self, config: Config, sock: Path, notifier: Notifier) -> None:
        self.config = config
        self.sock = sock
        self.notifier = notifier
        self.stop = asyncio.Event()
        self.forced = 0  # stop signals after the first
        # Preloads and reloads: cancelled at shutdown.
        self.tasks: set[asyncio.Task[Any]] = set()
        self.http: HttpFront | None = None  # the [http] listener, when there is one
        self.lines: JsonLinesServer | None = None  # <socket>.json, for mmctl's quick commands

    # --- startup ----------------------------------------------------------------------

    async def startup(self) -> None:
        """Engine, listeners, gRPC server, signal handlers, then READY=1 and the preloads."""
        await self._start_engine()
        await self._start_grpc()
        await self._start_lines()
        self._handle_signals()
        self.watchdog = asyncio.get_running_loop().create_task(
            run_watchdog(self.notifier, self.stop)
        )
        count = len(self.config.models)
        self.notifier.ready(f"serving {self.sock} with {count} models")
        log.info("mmd %s serving on %s (%d models)", __version__, self.sock, count)
        log_discovery(self.config)
        self.start_task(_preload_and_report(self.engine, self.notifier))

    async def _start_engine(self) -> None:
        config, sock = self.config, self.sock
        watch_children_with_pidfd()
        candidates, _ = llama_server_candidates(config.daemon.llama_server)
        runtime = LlamaRuntime(candidates, VerdictCache(config.daemon.state_dir))
        footprints = {m: footprint_for(spec) for m, spec in config.models.items()}
        rundir.prepare_log_dir(config.daemon.log_dir)  # first: a bad one leaves nothing behind
        rundir.prepare_socket_dir(sock)
        self.lock = _take_lock(sock)
        children = rundir.fresh_children_dir(sock)
        self.probe = MemoryProbe()
        self.engine = Engine(config, runtime, self.probe, children, footprints=footprints)
        self.metrics = await start_metrics(self.engine, config.metrics.listen)
        if config.http.enabled:
            # aiohttp and the front door's modules load only when [http] is set.
            from mmd.api.web.front import start_http

            self.http = await start_http(self.engine, config.http)
        runtime.start()  # proves the binary in the background when no verdict is cached
        await self.engine.start()

    async def _start_grpc(self) -> None:
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                # grpc-core randomly cancels calls the application has not picked up yet
                # once more than 1,000 wait (all of them past 3,000): a burst of requests
                # would see a bare CANCELLED. mmd bounds its own queue ([scheduler]
                # max_queue) and refuses beyond it with RESOURCE_EXHAUSTED, so the transport
                # must not refuse first.
                ("grpc.server.max_pending_requests", _MAX_PENDING_CALLS),
                ("grpc.server.max_pending_requests_hard_limit", _MAX_PENDING_CALLS),
            ]
        )
        server = self.server
        self.servicer = ModelManager(self.engine)
        mmd_pb2_grpc.add_ModelManagerServicer_to_server(self.servicer, server)
        self.health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(self.health_servicer, server)
        self.service_names = (
            mmd_pb2.DESCRIPTOR.services_by_name["ModelManager"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(self.service_names, server)
        old_umask = os.umask(0o117)  # socket rw for owner and group only
        try:
            server.add_insecure_port(f"unix:{self.sock}")
        finally:
            os.umask(old_umask)
        await server.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def _start_lines(self) -> None:
        """The JSON Lines socket beside the gRPC one. Without it mmctl uses gRPC for
        everything, only slower to start: a path that is in the way costs a warning, not
        the daemon."""
        lines = JsonLinesServer(self.engine, paths.json_socket(self.sock))
        try:
            await lines.start()
        except (rundir.SocketInTheWay, OSError) as err:
            log.warning("no JSON Lines socket (mmctl uses gRPC for every command): %s", err)
            return
        self.lines = lines

    async def _set_health(self, status: Any) -> None:
        for name in ("", self.service_names[0]):
            await self.health_servicer.set(name, status)

    def _handle_signals(self) -> None:
        """SIGTERM and SIGINT stop (a second one exits at once); SIGHUP reloads."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)

    def _on_stop_signal(self, signum: int) -> None:
        if self.stop.is_set():
            self.forced += 1
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)  # children get SIGKILL through their parent-death signal
        log.info("%s: shutting down", signal.Signals(signum).name)
        self.stop.set()

    def _on_reload_signal(self) -> None:
        log.info("SIGHUP: reloading %s", self.config.source or "the config")
        self.start_task(self._reload())

    async def _reload(self) -> None:
        self.notifier.reloading()
        try:
            await reload_config(self.engine)
        except ConfigError as err:
            log.error("reload refused, the old config stays in force: %s", err)
        except Exception:
            log.exception("reload failed, the old config stays in force")
        finally:
            self.notifier.ready(self.engine.status_line())

    def start_task(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # --- run --------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT."""
        await self.stop.wait()

    # --- shutdown ---------------------------------------------------------------------

    async def shutdown(self) -> None:
        """STOPPING=1, stop accepting, drain, stop the children, then remove what startup
        made: the listeners, the watchdog, the probe, the socket, its children's directory
        and the lock."""
        loop = asyncio.get_running_loop()
        engine, config = self.engine, self.config
        for task in list(self.tasks):
            task.cancel()  # preloads and reloads: nothing new starts from here
        self.notifier.stopping("draining requests")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.http is not None:
            await self.http.stop_accepting()
        if self.lines is not None:
            self.lines.stop_accepting()
        drain = config.daemon.drain_timeout
        # Stop taking new RPCs; running ones finish within the drain period.
        server_stopped = loop.create_task(self.server.stop(drain + config.daemon.stop_grace))
        closing = loop.create_task(engine.close(drain))
        # Once the drain is over (the scheduler is closed), what still runs is told ABORTED
        # at once instead of waiting for its child to stop (up to stop_grace), past which
        # grpc would end it as UNAVAILABLE "Cancelling all calls". Watch and Logs streams
        # end by themselves, with their own status.
        while not engine.closed and not closing.done():
            await asyncio.sleep(_CLOSED_POLL_S)
        await interrupt_calls(self.servicer.calls, spare=frozenset({"Watch", "Logs"}))
        if self.lines is not None:
            await self.lines.interrupt()
        await closing
        if self.http is not None:
            await self.http.close()
        await server_stopped
        if self.metrics is not None:
            await self.metrics.close()
        self.watchdog.cancel()
        self.probe.close()
        if self.lines is not None:
            self.lines.remove()
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()
        rundir.remove_children_dir(self.sock)
        self.lock.close()
        log.info("stopped")


async def serve(config: Config, sock: Path, notifier: Notifier) -> None:
    """Start, serve until SIGTERM or SIGINT, then shut down (as uvicorn's Server.serve)."""
    daemon = Daemon(config, sock, notifier)
    await daemon.startup()
    try:
        await daemon.run()
    finally:
        await daemon.shutdown()


async def _preload_and_report(engine: Engine, notifier: Notifier) -> None:
    """Preload (after READY=1: serving does not wait), then keep STATUS= current."""
    try:
        await engine.preload(lambda n, total, m: notifier.status(f"preloading {n}/{total}: {m}"))
    except Exception:  # a preload problem must never stop the daemon
        log.exception("preload failed")
    sent = ""
    while True:
        line = engine.status_line()
        if line != sent:
            notifier.status(line)
            sent = line
        await asyncio.sleep(1.0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmd",
        description="Run several local LLMs (llama-server) within the machine's memory, "
        "served over gRPC on a Unix socket. Drive it with mmctl.",
        epilog="Exit status: 0 stopped cleanly; 2 invalid config, or a socket path or "
        "directory that is unusable or that another user could control; "
        "3 another mmd serves the socket; 4 no llama-server found (with --check-config: "
        "or none that passes the daemon's check).",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="config file (else $MMD_CONFIG, $XDG_CONFIG_HOME/mmd/mmd.toml, /etc/mmd/mmd.toml)",
    )
    parser.add_argument(
        "--socket",
        type=Path,
        help="socket path (else the config's daemon.socket, $MMD_SOCKET, the runtime directory)",
    )
    parser.add_argument(
        "--check-config",
        nargs="?",
        const=True,
        default=False,
        metavar="PATH",
        help="validate the config (PATH, else the one --config or the lookup finds) and exit",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("MMD_LOG_LEVEL", "info"),
        choices=["trace", "debug", "info", "warning", "error"],
        help="mmd's own messages from this level up (default: info, or $MMD_LOG_LEVEL); "
        "libraries log warnings only, except at trace (debug for everything)",
    )
    parser.add_argument("--version", action="version", version=f"mmd {__version__}")
    return parser


def _setup_logging(level: str) -> None:
    """One line per event on stderr (journald adds the timestamps): mmd's own loggers at
    ``level``; the libraries' (aiohttp, grpc, gguf, asyncio) at warnings only, except at
    ``trace``, which is ``debug`` for everyone. (At debug, an HTTP client's log can be
    hundreds of lines a second about the children's health polls.)"""
    logging.basicConfig(
        level=logging.DEBUG if level == "trace" else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("mmd").setLevel(logging.DEBUG if level == "trace" else level.upper())


def _socket_path(args: argparse.Namespace, config: Config) -> Path:
    """The socket to serve, from --socket, $MMD_SOCKET or the config; checked for length."""
    if args.socket:
        sock, where = Path(args.socket).absolute(), "--socket"
    elif "MMD_SOCKET" in os.environ:
        sock, where = paths.default_socket().absolute(), "$MMD_SOCKET"
    else:
        sock, where = config.daemon.socket.absolute(), f"{config.source}: daemon.socket"
    check_socket_path(sock, where)
    return sock


def _check_config(config: Config, sock: Path) -> str:
    """``--check-config``: what a start would refuse or fail on, without starting or
    creating anything (ConfigError, exit 2; RuntimeFailed, exit 4). The lines to print:
    the verdict, then each discovered model and each of discovery's notes."""
    for spec in config.models.values():
        footprint_for(spec)
    rundir.check_log_dir(config.daemon.log_dir)
    rundir.check_socket_dir(sock)
    candidates, _ = llama_server_candidates(config.daemon.llama_server)  # an explicit one alone
    # The daemon's own check (a tiny model loaded and run, 0.1-0.3 s, or a cached verdict);
    # a chosen binary that fails it would serve, but fail every load.
    cache = VerdictCache(config.daemon.state_dir)
    choice = asyncio.run(choose(candidates, cache, record=False))
    if choice.binary is None or choice.verdict is None:
        raise RuntimeFailed(failure_line(choice.rejected))
    binary, verdict = choice.binary, choice.verdict
    where = config.source or "built-in defaults"
    models = summary({m: spec.source for m, spec in config.models.items()})
    lines = [
        f"{where}: ok ({models}), llama-server {binary.path} "
        f"({binary.source}): {verdict.detail or 'works'}"
    ]
    lines += [
        f"  {m}: {spec.source} {spec.path}"
        for m, spec in config.models.items()
        if spec.source != "config"
    ]
    lines += [f"  note: {note}" for note in config.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        if isinstance(args.check_config, str):
            args.config = Path(args.check_config)
        config = load_registry(args.config)
        sock = _socket_path(args, config)
        if args.check_config:
            print(_check_config(config, sock))
            return
        notifier = Notifier()
        try:
            asyncio.run(serve(config, sock, notifier))
        finally:
            notifier.close()
    except ConfigError as err:
        print(f"mmd: {err}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    except StartupError as err:
        print(f"mmd: {err}", file=sys.stderr)
        raise SystemExit(err.code) from None
    except MmdError as err:
        print(f"mmd: {err.message}", file=sys.stderr)
        raise SystemExit(EXIT_RUNTIME) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
