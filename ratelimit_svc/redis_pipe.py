"""A pipelined connection to one Redis for the decision path: hiredis parsing, no pool.

Why not redis.asyncio for every decision: on this kind of machine its per-command
path (pool, retry wrapper, stream reader, a timeout per read) costs ~200 us of CPU
per EVALSHA, as much as the rest of a Check. Here a call packs its command into
a buffer written once per loop turn (so calls that arrive together share one
write), and replies are matched to callers in order as hiredis yields them:
~50 us per call. Everything else (script loads, probes, the copy back after an
outage, Redis Cluster) still goes through redis.asyncio.
"""
import asyncio
import collections
import socket
import ssl
import urllib.parse

import hiredis
import redis.exceptions
from redis.asyncio import connection as redis_connection

# Calls waiting for a reply on one connection, at most.
WAITING_MAX = 10_000


class RedisPipe:
    """Calls to one Redis server over one connection, opened on first use and
    again after any failure. Calls carry no timeout of their own: the caller
    bounds them, and after one times out calls reset(), since its reply could
    otherwise be taken for the next call's."""

    def __init__(self, url: str, *, timeout_s: float) -> None:
        params = redis_connection.parse_url(url)
        self._host = params.get("host", "127.0.0.1")
        self._port = int(params.get("port", 6379))
        self._handshake = []
        if params.get("password"):
            auth = [params["username"]] if params.get("username") else []
            self._handshake.append(("AUTH", *auth, params["password"]))
        if int(params.get("db", 0)):
            self._handshake.append(("SELECT", int(params["db"])))
        self._ssl = _ssl_context(url) if urllib.parse.urlsplit(url).scheme == "rediss" else None
        self._timeout_s = timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task | None = None

    async def call(self, *args):
        """The reply to one command; an error reply raises ResponseError
        (NoScriptError for NOSCRIPT), a lost connection ConnectionError."""
        return await self.send(pack(args))

    async def send(self, packed: bytes):
        """call() with the command already packed (see pack)."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connect()
        return await protocol.send(packed)

    def reset(self) -> None:
        """Drops the connection, failing the calls waiting on it; the next call opens another."""
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.close()

    async def _connect(self) -> "_Protocol":
        # Callers arriving while a connection is being made all wait for that one.
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._open())
            # Every caller may have given up before it ends: its failure is theirs to see, not a warning.
            self._connecting.add_done_callback(lambda task: task.cancelled() or task.exception())
        connecting = self._connecting
        try:
            async with asyncio.timeout(self._timeout_s):
                return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _open(self) -> "_Protocol":
        loop = asyncio.get_running_loop()
        # Bounded on its own too: a host that drops packets must not leave a
        # connection attempt hanging for minutes, for later callers to wait on.
        async with asyncio.timeout(self._timeout_s):
            try:
                _, protocol = await loop.create_connection(_Protocol, self._host, self._port, ssl=self._ssl)
            except OSError as error:
                raise redis.exceptions.ConnectionError(
                    f"connecting to {self._host}:{self._port}: {error}") from error
            try:
                for command in self._handshake:
                    await protocol.send(pack(command))
            except BaseException:
                protocol.close()
                raise
        self._protocol = protocol
        return protocol

    async def close(self) -> None:
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
            await asyncio.wait([connecting])
        self.reset()


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._waiting: collections.deque[asyncio.Future] = collections.deque()
        self._out: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, packed: bytes) -> asyncio.Future:
        if self.closed:
            raise redis.exceptions.ConnectionError("connection closed")
        if len(self._waiting) >= WAITING_MAX:
            raise redis.exceptions.ConnectionError("too many calls waiting for Redis")
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(packed)
        return future

    def _flush(self) -> None:
        if self._out and not self.closed:
            self._transport.write(b"".join(self._out))
        self._out.clear()

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as error:
                self._fail(redis.exceptions.ConnectionError(f"protocol error: {error}"))
                return
            if reply is False:
                return
            if not self._waiting:
                self._fail(redis.exceptions.ConnectionError("a reply nobody asked for"))
                return
            future = self._waiting.popleft()
            if future.done():  # its caller gave up
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(_error(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        failure = redis.exceptions.ConnectionError(f"connection lost: {exc}" if exc else "connection closed")
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(failure)

    def _fail(self, error: Exception) -> None:
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._transport is not None:
                self._transport.close()


def _error(message: str) -> redis.exceptions.ResponseError:
    if message.startswith("NOSCRIPT"):
        return redis.exceptions.NoScriptError(message)
    return redis.exceptions.ResponseError(message)


def pack(args) -> bytes:
    """RESP: an array of bulk strings."""
    return b"*%d\r\n" % len(args) + _bulks(args)


def packer(*head):
    """pack() for commands that start with the words `head`, packed once."""
    packed_head = _bulks(head)

    def pack_rest(rest: tuple) -> bytes:
        return b"*%d\r\n" % (len(head) + len(rest)) + packed_head + _bulks(rest)

    return pack_rest


def _bulks(words) -> bytes:
    out = []
    for word in words:
        if isinstance(word, str):
            word = word.encode()
        elif isinstance(word, int):
            word = b"%d" % word
        out.append(b"$%d\r\n%s\r\n" % (len(word), word))
    return b"".join(out)


def _ssl_context(url: str) -> ssl.SSLContext:
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    context = ssl.create_default_context(cafile=query.get("ssl_ca_certs", [None])[0])
    if query.get("ssl_cert_reqs", [""])[0].lower() in ("none", "optional"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
