"""The Blue Book's asyncio UDP and TCP listeners, change watching and DNS UPDATE application.

The protocol work is in :mod:`mailstack.bluebook.responder`; this module only
moves bytes, applies updates through the store, and swaps in a new
:class:`Directory` when the store's generation changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import struct
from typing import Any

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode

from mailstack.bluebook import update
from mailstack.bluebook.config import BlueBookConfig, parse_endpoint, parse_key_entry
from mailstack.bluebook.directory import Directory
from mailstack.bluebook.responder import Responder, Transfer, UpdateRequest, header_reply
from mailstack.bluebook.zonestore import KeyInfo, ZoneNotFound, ZoneStore, ZoneStoreError

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("!H")


class UDPProtocol(asyncio.DatagramProtocol):
    """One UDP socket: answers from the cache at once, everything else through the responder."""

    def __init__(self, server: BlueBookServer) -> None:
        self.server = server
        self.fast = server.responder.fast
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        reply = self.fast(data, False)
        if reply is not None:
            self.transport.sendto(reply, addr)  # type: ignore[union-attr]
            return
        result = self.server.handle(data, addr, tcp=False)
        if isinstance(result, bytes):
            self.transport.sendto(result, addr)  # type: ignore[union-attr]
        elif isinstance(result, UpdateRequest):
            self.server.spawn(self._reply_to_update(result, addr))

    async def _reply_to_update(self, request: UpdateRequest, addr: Any) -> None:
        reply = await self.server.run_update(request, tcp=False)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP socket error: %s", exc)


class BlueBookServer:
    """Listeners on every configured address, the change watcher and the update path."""

    def __init__(self, config: BlueBookConfig, store: ZoneStore) -> None:
        self.config = config
        self.store = store
        section = config.server
        self.responder = Responder(
            Directory({}),
            max_udp_payload=section.max_udp_payload,
            cache_size=section.answer_cache_size,
            axfr_allow=section.axfr_allow,
        )
        self.generation = -1
        # Whether a snapshot was loaded before: the first load sends no NOTIFY.
        self.generation_loaded = False
        self.port = section.port
        self.addresses: list[tuple[str, int]] = []
        self._udp: list[asyncio.DatagramTransport] = []
        self._tcp: list[asyncio.base_events.Server] = []
        self._sessions: dict[asyncio.Task[Any], bool] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._update_lock = asyncio.Lock()
        self._reload_lock = asyncio.Lock()
        self._config_keys = [KeyInfo(*parse_key_entry(entry), source="config") for entry in config.keys.tsig]
        self._notify_targets = [parse_endpoint(target) for target in section.notify]

    # Start and stop --------------------------------------------------------------------

    async def start(self) -> None:
        await self.reload(force=True)
        loop = asyncio.get_running_loop()
        port = self.config.server.port
        for host in self.config.server.listen:
            transport, _protocol = await loop.create_datagram_endpoint(lambda: UDPProtocol(self), local_addr=(host, port))
            self._udp.append(transport)
            _enlarge_receive_buffer(transport)
            if port == 0:
                port = transport.get_extra_info("sockname")[1]
            tcp = await asyncio.start_server(self._tcp_session, host, port, reuse_address=True)
            self._tcp.append(tcp)
            self.addresses.append((host, port))
            log.info("Blue Book listening on %s port %d (UDP and TCP)", host, port)
        self.port = port
        self._watcher = asyncio.create_task(self._watch(), name="bluebook-watch")

    async def stop(self) -> None:
        """Stop listening, let busy TCP sessions finish within the shutdown timeout, then close."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for transport in self._udp:
            transport.close()
        for server in self._tcp:
            server.close()
        for task, busy in list(self._sessions.items()):
            if not busy:
                task.cancel()
        pending = set(self._sessions) | self._tasks
        if pending:
            _done, still = await asyncio.wait(pending, timeout=self.config.server.shutdown_timeout)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still)
                log.warning("%d TCP sessions or updates cancelled at shutdown", len(still))
        for server in self._tcp:
            await server.wait_closed()
        log.info("Blue Book stopped")

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # Changes ---------------------------------------------------------------------------

    async def reload(self, *, force: bool = False) -> bool:
        """Load the store into a new Directory if its generation changed; return whether it did."""
        async with self._reload_lock:
            if not force and await self.store.generation() == self.generation:
                return False
            snapshot = await self.store.snapshot()
            directory = Directory.from_snapshot(snapshot)
            previous = self.responder.directory
            self.responder.set_directory(directory)
            self.responder.set_keys(self._merge_keys(snapshot.keys))
            changed = snapshot.generation != self.generation
            self.generation = snapshot.generation
        if changed:
            log.info(
                "loaded %d zones and %d TSIG keys (generation %d)",
                len(directory.zones),
                len(self.responder.keyring),
                snapshot.generation,
            )
        if self.generation_loaded:
            self._notify_changes(previous, directory)
        self.generation_loaded = True
        return True

    # NOTIFY --------------------------------------------------------------------------------

    def _notify_changes(self, previous: Directory, current: Directory) -> None:
        """Send NOTIFY for every zone that is new or whose serial changed since ``previous``."""
        if not self._notify_targets:
            return
        for origin, zone in current.zones.items():
            old = previous.zones.get(origin)
            if old is not None and old.soa[0].serial == zone.soa[0].serial:
                continue
            for target in self._notify_targets:
                self.spawn(self._notify(origin, zone.soa, target))

    async def _notify(self, origin: dns.name.Name, soa: Any, target: tuple[str, int]) -> None:
        """Send one zone's NOTIFY to one secondary, retrying until it replies (RFC 1996 section 3.6)."""
        message = dns.message.make_query(origin, "SOA")
        message.set_opcode(dns.opcode.NOTIFY)
        message.flags = (message.flags & ~dns.flags.RD) | dns.flags.AA
        message.answer.append(soa)
        host, port = target
        serial = soa[0].serial
        attempts = self.config.server.notify_attempts
        for attempt in range(1, attempts + 1):
            try:
                reply = await dns.asyncquery.udp(message, host, port=port, timeout=self.config.server.notify_timeout)
            except (dns.exception.DNSException, OSError) as exc:
                log.info(
                    "NOTIFY of %s serial %d to %s port %d: attempt %d of %d failed: %s",
                    origin, serial, host, port, attempt, attempts, str(exc) or type(exc).__name__,
                )
                continue
            log.info(
                "NOTIFY of %s serial %d to %s port %d: reply %s",
                origin, serial, host, port, dns.rcode.to_text(reply.rcode()),
            )
            return
        log.warning("NOTIFY of %s serial %d to %s port %d: no reply after %d attempts", origin, serial, host, port, attempts)

    def _merge_keys(self, stored: list[KeyInfo]) -> list[KeyInfo]:
        names = {key.name for key in self._config_keys}
        merged = list(self._config_keys)
        for key in stored:
            if key.name in names:
                log.warning("TSIG key %s is in the config and the database; the config's secret is used", key.name)
                continue
            merged.append(key)
        return merged

    async def _watch(self) -> None:
        interval = self.config.server.reload_interval
        failures = 0
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload()
                failures = 0
            except Exception:  # noqa: BLE001 - keep serving the last good data
                failures += 1
                if failures == 1 or failures % 100 == 0:
                    log.exception("reloading the Blue Book store failed (%d in a row); still serving the last data", failures)

    # Requests --------------------------------------------------------------------------

    def handle(self, data: bytes, peer: Any, *, tcp: bool) -> Any:
        """Run the responder; an unexpected error becomes SERVFAIL with the details in the log."""
        try:
            return self.responder.handle(data, peer, tcp)
        except Exception:  # noqa: BLE001 - one bad request must not stop the server
            log.exception("internal error answering %d bytes from %s; replied SERVFAIL", len(data), peer)
            if len(data) >= 12 and not data[2] & 0x80:
                return header_reply(data, dns.rcode.SERVFAIL)
            return None

    async def run_update(self, request: UpdateRequest, *, tcp: bool) -> bytes:
        """Apply a signed UPDATE in one store transaction and return the signed reply."""
        message = request.message
        origin = request.zone.origin
        key = message.keyname
        peer = request.peer[0] if isinstance(request.peer, tuple) else request.peer
        try:
            update.prescan(message, origin)
            async with self._update_lock:
                touched, changed, serial = await self.store.modify_zone(
                    origin, lambda content: update.apply(content, message)
                )
            rcode = dns.rcode.NOERROR
            log.info(
                "UPDATE of %s with key %s from %s: %d records applied, %s, serial %d",
                origin, key, peer, touched, "zone changed" if changed else "no change", serial,
            )
            if changed:
                await self.reload(force=True)
        except update.UpdateRejected as exc:
            rcode = exc.rcode
            log.info("UPDATE of %s with key %s from %s rejected with %s: %s", origin, key, peer, exc.rcode.name, exc.reason)
        except ZoneNotFound:
            rcode = dns.rcode.NOTAUTH
            log.info("UPDATE of %s from %s: the zone was removed meanwhile", origin, peer)
        except ZoneStoreError as exc:
            rcode = dns.rcode.REFUSED
            log.info("UPDATE of %s with key %s from %s refused: %s", origin, key, peer, exc)
        except Exception:  # noqa: BLE001 - answer SERVFAIL, keep serving
            rcode = dns.rcode.SERVFAIL
            log.exception("UPDATE of %s from %s failed; replied SERVFAIL", origin, peer)
        return self.responder.update_reply(request, rcode, tcp)

    async def _tcp_session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        task = asyncio.current_task()
        assert task is not None
        if len(self._sessions) >= self.config.server.tcp_max_connections:
            log.warning("closed TCP connection from %s: %d connections already open", peer, len(self._sessions))
            writer.close()
            return
        self._sessions[task] = False
        idle = self.config.server.tcp_idle_timeout
        queries = 0
        try:
            while True:
                self._sessions[task] = False
                try:
                    prefix = await asyncio.wait_for(reader.readexactly(2), idle)
                    (length,) = _LENGTH.unpack(prefix)
                    data = await asyncio.wait_for(reader.readexactly(length), idle)
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                except TimeoutError:
                    log.debug("TCP connection from %s idle for %.1f s; closing", peer, idle)
                    break
                self._sessions[task] = True
                queries += 1
                await self._answer_tcp(data, peer, writer)
        except ConnectionError as exc:
            log.debug("TCP connection from %s failed: %s", peer, exc)
        except asyncio.CancelledError:
            # Shutdown cancels idle sessions. Ending normally keeps asyncio's
            # stream callback (Python 3.11) from logging the cancellation as an error.
            log.debug("TCP connection from %s closed at shutdown", peer)
        finally:
            self._sessions.pop(task, None)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            log.debug("TCP connection from %s closed after %d queries", peer, queries)

    async def _answer_tcp(self, data: bytes, peer: Any, writer: asyncio.StreamWriter) -> None:
        reply = self.responder.fast(data, True)
        if reply is None:
            result = self.handle(data, peer, tcp=True)
            if isinstance(result, UpdateRequest):
                reply = await self.run_update(result, tcp=True)
            elif isinstance(result, Transfer):
                for message in result.messages:
                    writer.write(_LENGTH.pack(len(message)) + message)
                    await writer.drain()
                return
            else:
                reply = result
        if reply is not None:
            writer.write(_LENGTH.pack(len(reply)) + reply)
            await writer.drain()


# A burst of queries larger than the kernel's default UDP receive buffer (about
# 200 KiB on Linux) would be dropped before the event loop reads it.
UDP_RECEIVE_BUFFER = 4 * 1024 * 1024


def _enlarge_receive_buffer(transport: asyncio.DatagramTransport) -> None:
    """Ask for a larger receive buffer; the kernel caps it at net.core.rmem_max."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
    except OSError as exc:
        log.debug("could not enlarge the UDP receive buffer: %s", exc)


async def run(config: BlueBookConfig) -> int:
    """Serve until SIGTERM or SIGINT; return the exit status."""
    config.server.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        store = await ZoneStore.open(config.database_url)
    except ZoneStoreError as exc:
        log.error("cannot open the Blue Book store: %s", exc)
        return 1
    server = BlueBookServer(config, store)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        try:
            await server.start()
        except OSError as exc:
            log.error("cannot listen: %s", exc.strerror or exc)
            await server.stop()
            return 1
        log.info("Blue Book running with database %s", config.database_url)
        await stop.wait()
        log.info("Blue Book stopping")
        await server.stop()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await store.close()
    return 0


def run_forever(config: BlueBookConfig) -> int:
    """Run the server under uvloop where installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.run(run(config))
    return uvloop.run(run(config))
