"""A small pooled HTTP/1.1 client for the two documented provider APIs, on asyncio's own transports.

The relay sends one kind of request (a JSON POST) and reads one of two kinds of answer (a JSON body,
or an event stream), to a handful of hosts, millions of times. A general client (aiohttp) builds a
request object, header multidicts, cookie handling, payload writers and a response object per call,
which was about 40% of the Python time of a whole /api/chat request (py-spy). Here a request is one
pre-built byte string and one write; the answer is parsed as it arrives by an
`asyncio.BufferedProtocol`: the head once, then the body (Content-Length, chunked, or up to the
close) straight into a buffer the caller drains, with the transport paused while that buffer is full.
Reads land in one buffer the pool's connections share (`READ_BUFFER`), so over TLS each record is
decrypted into it (uvloop's and asyncio's SSL transports both do that for a buffered protocol)
instead of into a fresh 256 KiB bytes object per record, cut down and joined per read: about
0.3 us of the 4-5 us a record costs the server worker; in a process whose allocator still has its
default mmap threshold each of those objects was an mmap, mremap and munmap (a 20-event stream
over TLS 782 -> 336 us of CPU, client and server in one process).

What it does, as HTTP/1.1 asks of a client: keep-alive connections reused LIFO, dropped when the
server closes them, says `Connection: close`, sends a byte out of turn, or they sat idle past
`KEEPALIVE_S` or the server's own `Keep-Alive: timeout` less `KEEPALIVE_MARGIN_S`; at most
`MAX_IDLE_PER_POOL` idle per pool, the least recently used closed first, and those past their idle
limit closed whenever a connection is taken or released (no timer per connection). A request that
meets a reused connection the server had already closed raises `StaleConnection` rather than
being sent again here: the caller counts that resend as a retry (http_provider.py). 1xx interim
answers are skipped (a 101 is an error: we never ask to upgrade); TLS (SNI, the system's CAs) for
https base URLs; new connections try the host's addresses Happy-Eyeballs style (aiohappyeyeballs,
as aiohttp does); an egress proxy (proxy.py) is reached with a CONNECT tunnel for https origins
and absolute-form requests for http ones. The base URL's query string is kept on every request,
an IDN host is sent as its A-label.

What it refuses rather than misreads: a status or Content-Length that is not ASCII digits (or
Content-Lengths that disagree), a head past `MAX_HEAD_BYTES` however it arrived, a
`Content-Encoding` other than identity (we ask for identity), a `Transfer-Encoding` other than
exactly `chunked`. A head ended by bare LFs is read as llhttp does (leniently) instead of waiting
for a CRLF that never comes. What it leaves out, because neither API needs it: redirects,
cookies, compression, HTTP/2.

Every connection ends, whatever happens to the request on it: a provider keeps generating (and
billing) for as long as its connection is open. A cancel or a timeout while waiting for the head
or reading a whole body closes the connection; so does dropping a `Response` without releasing or
closing it. A stream released before its closing chunk arrived is read on for `DRAIN_TIMEOUT_S`
at most, then closed; `Pool.aclose` closes those still draining along with the idle ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from urllib.parse import quote, urlsplit

import aiohappyeyeballs

from pwachat.providers.proxy import Proxy, ascii_host

__all__ = ["ConnectFailed", "Pool", "ProxyRefused", "Response", "StaleConnection", "TransportError"]

KEEPALIVE_S = 30.0
#: A server's `Keep-Alive: timeout=N` shortens a connection's idle limit to N minus this (uvicorn and
#: vLLM say 5): a request written as the server's timer fires meets a close, so we stop short of it.
KEEPALIVE_MARGIN_S = 1.0
#: Idle connections kept per pool at most (LIFO, so the ones past it are the least recently used):
#: a burst of a few thousand concurrent requests does not leave as many sockets open afterwards.
MAX_IDLE_PER_POOL = 256
CONNECT_TIMEOUT_S = 10.0
MAX_HEAD_BYTES = 64 * 1024
#: Pause reading when this much body is waiting to be consumed, resume below a quarter of it.
HIGH_WATER = 1024 * 1024
#: The size of the read buffer each pool's connections share: what one socket read (or, over TLS,
#: one pass of decrypting what arrived) hands the parser at most.
READ_BUFFER = 64 * 1024
_HEX = b"0123456789abcdefABCDEF"
_DIGITS = "0123456789"
#: The largest whole (non-streamed) answer read: a chat completion is a few kilobytes.
MAX_BODY_BYTES = 32 * 1024 * 1024
#: How long a stream released before its closing chunk (usually in flight: a round trip) is read on
#: so that its connection can be pooled; a server that never sends it has its connection closed.
DRAIN_TIMEOUT_S = 1.0


class TransportError(ConnectionError):
    """The connection broke, or the server answered something that is not HTTP/1.x."""


class ConnectFailed(TransportError):
    """No connection could be made (refused, unreachable, TLS failure, timed out)."""


class StaleConnection(TransportError):
    """A reused keep-alive connection closed before any byte of the answer came back: the server
    timed it out as we wrote. Whether the request reached the server is unknown, so the pool does
    not send it again itself; the caller's retry budget decides (`http_provider.UpstreamHTTP`)."""


class ProxyRefused(ConnectFailed):
    """The egress proxy refused the CONNECT tunnel (407, 403, 502...); `status` is its answer (0:
    not HTTP). The message names the proxy's host and port, never its credentials."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _is_number(text: str) -> bool:
    # str.isdigit() is true of '²' and other non-ASCII digits, which int() then refuses.
    return bool(text) and not text.strip(_DIGITS)


class _Conn(asyncio.BufferedProtocol):
    """One connection, one response at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.drain_timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self.buf = bytearray()  # raw bytes not parsed yet
        self.body = bytearray()  # decoded body bytes not consumed yet
        self.received = 0  # raw bytes of this exchange (0: the server never answered)
        self.status = 0
        self.headers: dict[str, str] = {}
        self.state = "idle"  # head, body, done
        self.framing = ""  # length, chunked, eof
        self.remaining = 0  # length: body bytes to come; chunked: bytes left in this chunk
        self.chunk_phase = "size"  # size, data, crlf, trailer
        self.reusable = True
        self.idle_limit = KEEPALIVE_S  # shortened by the server's `Keep-Alive: timeout=N`
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.interrupted = False  # `interrupt()`: the reader's deadline passed (see readany)
        self.paused = False
        self.draining = False  # released before its end arrived: back to the pool once it has

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        # The pool's one buffer: every read is copied out of it (`buffer_updated`) before the loop
        # asks for it again, whichever connection that is for.
        return self.pool._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.pool._read_buffer[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self.state not in ("head", "body"):
            # Bytes nobody asked for (a server talking out of turn): this connection is not reusable.
            # The pool checks the flag when it takes a connection (`begin` sets it anew).
            self.reusable = False
            return
        self.received += len(data)
        self.buf += data
        try:
            self._parse()
        except TransportError as err:
            self.error = err
            self.reusable = False
            self.abort()
        if self.draining:
            self.body.clear()  # nobody reads it any more
            if self.state == "done" or self.error is not None:
                self.pool._drained(self)
            return
        if self.framing and not self.paused and len(self.body) > HIGH_WATER and self.transport:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.state == "body" and self.framing == "eof" and exc is None:
            self.state = "done"  # a body delimited by the close: the close is its end
        elif self.state in ("head", "body") and self.error is None:
            self.error = TransportError("the connection closed before the answer was complete")
        if self.draining:
            self.pool._drained(self)
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def interrupt(self) -> None:
        """Wake the reader with nothing new: its own deadline has passed (`Response.readany`)."""
        self.interrupted = True
        self._wake()

    # -- parsing -------------------------------------------------------------------------------

    def _parse(self) -> None:
        buf = self.buf
        while self.state == "head":
            # The blank line that ends the head, as CRLF CRLF or, leniently as llhttp does, with bare
            # LFs (LF LF, LF CRLF): an answer spelled so is read at once instead of waiting for more.
            end = buf.find(b"\n\r\n")
            bare = buf.find(b"\n\n", 0, end + 1 if end >= 0 else len(buf))
            if bare >= 0:
                end, skip = bare, 2
            elif end >= 0:
                skip = 3
            else:
                if len(buf) > MAX_HEAD_BYTES:
                    raise TransportError("the response head is too long")
                return
            if end > MAX_HEAD_BYTES:  # the whole head came in one read: still too long
                raise TransportError("the response head is too long")
            head = bytes(buf[:end]).decode("latin-1")
            del buf[: end + skip]
            self._head(head)
        if self.state == "body":
            self._body()

    def _head(self, head: str) -> None:
        lines = head.split("\n")
        parts = lines[0].rstrip("\r").split(" ", 2)
        if (
            len(parts) < 2
            or not parts[0].startswith("HTTP/1.")
            or len(parts[1]) != 3
            or not (parts[1].isascii() and parts[1].isdigit())  # isdigit alone: '²' too
        ):
            raise TransportError("the answer is not HTTP/1.x")
        status = int(parts[1])
        if status == 101:
            # Switching Protocols: we never ask to upgrade, so what follows is not our answer.
            raise TransportError("the server switched protocols unasked (HTTP 101)")
        if 100 <= status < 200:
            return  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        headers: dict[str, str] = {}
        repeated: dict[str, list[str]] | None = None
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise TransportError("a response header line has no colon")
            key = name.strip().lower()
            value = value.strip()
            if key in headers:  # joined once at the end: a join per repeat is quadratic
                if repeated is None:
                    repeated = {}
                repeated.setdefault(key, [headers[key]]).append(value)
            else:
                headers[key] = value
        if repeated is not None:
            for key, values in repeated.items():
                headers[key] = ", ".join(values)
        self.status = status
        self.headers = headers
        if "close" in headers.get("connection", "").lower() or parts[0] == "HTTP/1.0":
            self.reusable = False
        keep_alive = headers.get("keep-alive")
        if keep_alive is not None:
            self._keep_alive(keep_alive)
        coding = headers.get("content-encoding")
        if coding is not None and coding.strip().lower() not in ("", "identity"):
            # We ask for identity (Accept-Encoding); a compressed body would be relayed as garbage.
            raise TransportError("the answer has a content encoding the client did not ask for")
        if status in (204, 304):
            self.framing = "length"
            self.state = "done"
            return
        transfer = headers.get("transfer-encoding")
        if transfer is not None:
            # chunked must be the last coding (RFC 9112 6.1); any other coding we cannot undo.
            if transfer != "chunked" and [c.strip().lower() for c in transfer.split(",") if c.strip()] != [
                "chunked"
            ]:
                raise TransportError("the answer has a transfer coding the client cannot read")
            self.framing = "chunked"
            if "content-length" in headers:
                self.reusable = False  # both: chunked wins, and the connection is not trusted after
        elif "content-length" in headers:
            values = {v.strip() for v in headers["content-length"].split(",")}
            length = values.pop()
            if values or not _is_number(length):
                raise TransportError("the Content-Length is not a number")
            self.framing = "length"
            self.remaining = int(length)
        else:
            self.framing = "eof"
            self.reusable = False
        self.state = "body"
        if self.framing == "length" and self.remaining == 0:
            self.state = "done"

    def _keep_alive(self, value: str) -> None:
        for param in value.split(","):
            name, _, number = param.partition("=")
            if name.strip().lower() == "timeout":
                number = number.strip().strip('"')
                if _is_number(number):
                    self.idle_limit = min(KEEPALIVE_S, int(number) - KEEPALIVE_MARGIN_S)
                return

    def _body(self) -> None:
        buf = self.buf
        if self.framing == "eof":
            self.body += buf
            buf.clear()
            return
        if self.framing == "length":
            take = min(self.remaining, len(buf))
            self.body += buf[:take]
            del buf[:take]
            self.remaining -= take
            if self.remaining == 0:
                self.state = "done"
                if buf:
                    self.reusable = False  # more than announced
            return
        # chunked: walk the buffer with an offset and cut it once (a relay's read holds many chunks)
        pos, size_of, body = 0, len(buf), self.body
        try:
            while pos < size_of:
                phase = self.chunk_phase
                if phase == "data":
                    take = min(self.remaining, size_of - pos)
                    body += buf[pos : pos + take]
                    pos += take
                    self.remaining -= take
                    if self.remaining == 0:
                        self.chunk_phase = "crlf"
                elif phase == "crlf":
                    if size_of - pos < 2:
                        return
                    if buf[pos : pos + 2] != b"\r\n":
                        raise TransportError("a chunk does not end with CRLF")
                    pos += 2
                    self.chunk_phase = "size"
                else:  # size or trailer: one line at a time
                    end = buf.find(b"\r\n", pos)
                    if end < 0:
                        if size_of - pos > MAX_HEAD_BYTES:
                            raise TransportError("a chunk header is too long")
                        return
                    line = bytes(buf[pos:end])
                    pos = end + 2
                    if phase == "trailer":
                        if not line:
                            self.state = "done"
                            if pos < size_of:
                                self.reusable = False
                            return
                        continue
                    size = line.split(b";", 1)[0].strip()
                    if not size or len(size) > 15 or size.strip(_HEX):
                        raise TransportError("a chunk size is not hexadecimal")
                    self.remaining = int(size, 16)
                    self.chunk_phase = "data" if self.remaining else "trailer"
        finally:
            del buf[:pos]

    # -- for the pool and the response ---------------------------------------------------------

    def begin(self, request: bytes) -> None:
        self._reset()
        self.state = "head"
        assert self.transport is not None
        self.transport.write(request)

    async def wait(self) -> None:
        """Until something new arrived (head, body bytes, the end or an error)."""
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def take(self) -> bytes:
        data = bytes(self.body)
        self.body.clear()
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def abort(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()


class Response:
    """A response whose head has arrived; the body is read with `read`, or as it comes with
    `read_nowait` / `readany`. `release()` when done (the connection goes back to the pool if it
    can), `close()` to drop the connection (the upstream sees it go at once). Either one ends the
    response's hold on the connection: a later `close()` cannot reach a connection the pool has
    handed to another request. A response dropped while it still holds its connection (a bug
    elsewhere, or an opened stream nobody took) closes it: the provider stops generating."""

    __slots__ = ("_conn", "_pool", "headers", "status")

    def __init__(self, conn: _Conn, pool: Pool) -> None:
        self._conn: _Conn | None = conn
        self._pool = pool
        self.status = conn.status
        self.headers = conn.headers

    def _held(self) -> _Conn:
        if self._conn is None:
            raise TransportError("the response was released")
        return self._conn

    async def read(self, limit: int = MAX_BODY_BYTES) -> bytes:
        """The whole body; a TransportError past `limit` bytes. Whatever cuts the read short (an
        error, a timeout, a cancel) closes the connection: its answer will never be read now."""
        conn = self._held()
        parts = []
        size = 0
        try:
            while True:
                if conn.body:
                    parts.append(conn.take())  # taken as it comes, so a paused transport resumes
                    size += len(parts[-1])
                    if size > limit:
                        raise TransportError("the answer is larger than the client accepts")
                if conn.state == "done":
                    return b"".join(parts)
                if conn.error is not None:
                    raise conn.error
                await conn.wait()
        except BaseException:
            self.close()
            raise

    def read_nowait(self) -> bytes:
        """What has arrived and not been read yet (maybe nothing); never raises."""
        return self._conn.take() if self._conn is not None else b""

    async def readany(self) -> bytes:
        """The next bytes; b"" once the body is complete. A broken connection raises, but only
        after the bytes that arrived before the break have been returned. `interrupt()` while
        nothing new has come raises TimeoutError (what has come since is returned first): the
        reader keeps its deadline in one timer of its own, not a timeout object per read."""
        conn = self._held()
        while True:
            if conn.body:
                conn.interrupted = False
                return conn.take()
            if conn.state == "done":
                return b""
            if conn.error is not None:
                raise conn.error
            if conn.interrupted:
                conn.interrupted = False
                raise TimeoutError
            await conn.wait()

    def interrupt(self) -> None:
        conn = self._conn
        if conn is not None:
            conn.interrupt()

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._release(conn)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()

    def __del__(self) -> None:
        conn = self._conn
        if conn is not None and not conn.closed:
            with contextlib.suppress(RuntimeError):  # its event loop is closed already: so is the socket
                conn.abort()


class Pool:
    """Keep-alive connections to one origin (maybe through an egress proxy), and the request bytes
    that go out on them."""

    def __init__(self, base_url: str, headers: dict[str, str], proxy: Proxy | None = None) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("the base URL must be http:// or https:// with a host")
        try:
            port = url.port
        except ValueError:
            raise ValueError("the base URL's port is not a number from 1 to 65535") from None
        # An IDN host (bücher.example) goes on the wire, into DNS and into SNI as its A-label.
        self.host = ascii_host(url.hostname)
        self.port = port or (443 if url.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if url.scheme == "https" else None
        self.proxy = proxy
        # The path as sent (anything outside ASCII percent-encoded), and the base URL's query string
        # (Azure's `api-version=...`), kept on every request (contract, "Providers"). The Anthropic
        # SDK hands us its base URL with its trailing slash appended after the query: not ours.
        self.prefix = quote(url.path.rstrip("/"), safe="/%:@!$&'()*+,;=-._~")
        query = url.query.removesuffix("/")
        self.query = "?" + quote(query, safe="=&%:@!$'()*+,;/?-._~") if query else ""
        default_port = self.port == (443 if url.scheme == "https" else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        authority = host if default_port else f"{host}:{self.port}"
        # Through a proxy to an http origin the request line names the whole URL (absolute form).
        self._origin = f"http://{authority}" if proxy is not None and self.ssl is None else ""
        # Later names win over earlier ones whatever their case; these are the client's own.
        chosen: dict[str, tuple[str, str]] = {}
        for name, value in headers.items():
            if any(c in name + value for c in "\r\n\0") or not name or ":" in name:
                raise ValueError(f"the header {name!r} cannot be sent")
            chosen[name.lower()] = (name, value)
        for own in ("host", "content-length", "transfer-encoding", "accept-encoding", "proxy-authorization"):
            chosen.pop(own, None)
        lines = [
            f"Host: {authority}",
            "Accept-Encoding: identity",
            *(f"{n}: {v}" for n, v in chosen.values()),
        ]
        if self._origin and proxy is not None and proxy.authorization:
            lines.append(f"Proxy-Authorization: {proxy.authorization}")  # to the proxy, which drops it
        self._headers = ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")
        self._connect_request = b""
        if proxy is not None and self.ssl is not None:
            tunnel = [f"CONNECT {host}:{self.port} HTTP/1.1", f"Host: {host}:{self.port}"]
            if proxy.authorization:
                tunnel.append(f"Proxy-Authorization: {proxy.authorization}")
            self._connect_request = ("\r\n".join(tunnel) + "\r\n\r\n").encode("latin-1")
        self._idle: list[_Conn] = []
        self._read_buffer = memoryview(bytearray(READ_BUFFER))  # see _Conn.get_buffer
        self._draining: set[_Conn] = set()  # released streams read on to their end (see _release)
        self._closed = False

    def request_bytes(self, path: str, body: bytes) -> bytes:
        target = (self._origin + self.prefix + path + self.query).encode("latin-1")
        return b"".join(
            (b"POST ", target, b" HTTP/1.1\r\n", self._headers, str(len(body)).encode(), b"\r\n\r\n", body)
        )

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        proxy = self.proxy
        host, port = (proxy.host, proxy.port) if proxy is not None else (self.host, self.port)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                # Happy Eyeballs (RFC 8305, as aiohttp does it): the addresses are tried staggered,
                # so a host whose IPv6 route is a black hole still connects over IPv4 at once.
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                sock = await aiohappyeyeballs.start_connection(infos, happy_eyeballs_delay=0.25, interleave=1)
                try:
                    if self._connect_request:
                        await self._tunnel(loop, sock)
                    _, conn = await loop.create_connection(
                        lambda: _Conn(self),
                        sock=sock,
                        ssl=self.ssl,
                        server_hostname=self.host if self.ssl else None,
                    )
                except BaseException:
                    sock.close()  # a failed or abandoned TLS handshake: the socket is still ours
                    raise
        except ProxyRefused:
            raise
        except (OSError, TimeoutError) as err:  # refused, unreachable, DNS, TLS (ssl.SSLError)
            through = f" through the proxy {proxy.where}" if proxy is not None else ""
            raise ConnectFailed(f"could not connect{through}: {type(err).__name__}") from None
        return conn

    async def _tunnel(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        """CONNECT through the proxy, on the bare socket: TLS to the origin then starts on it. The
        origin speaks only after our ClientHello, so nothing past the proxy's answer is read here."""
        assert self.proxy is not None
        await loop.sock_sendall(sock, self._connect_request)
        head = bytearray()
        while True:
            data = await loop.sock_recv(sock, 4096)
            if not data:
                raise ConnectionResetError("the proxy closed the connection")
            head += data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                end = head.find(b"\n\n")
            if end >= 0:
                break
            if len(head) > MAX_HEAD_BYTES:
                raise ProxyRefused(0, f"the proxy {self.proxy.where} answered the CONNECT with no HTTP")
        parts = bytes(head[:end]).split(b"\n", 1)[0].split()
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() and len(parts[1]) == 3 else 0
        if not 200 <= status < 300:
            said = f"HTTP {status}" if status else "no HTTP"
            raise ProxyRefused(status, f"the proxy {self.proxy.where} refused the tunnel ({said})")

    def _take(self) -> _Conn | None:
        """The most recently used idle connection still usable; those that are not are closed."""
        idle = self._idle
        now = time.monotonic()
        self._sweep(now)
        while idle:
            conn = idle.pop()
            if conn.closed or not conn.reusable or now - conn.idle_since > conn.idle_limit:
                conn.abort()  # closed by the server, talked out of turn, or idle past its limit
                continue
            return conn
        return None

    async def send(self, request: bytes) -> Response:
        """Send `request` and wait for the head of its answer (interim 1xx skipped).

        A reused connection that turns out closed before any byte of the answer came back (the
        server timed it out as we wrote) raises `StaleConnection`: the request may or may not have
        reached the server, so sending it again is the caller's to decide and count. Cancelled or
        failed half-way, the connection is dropped."""
        conn = self._take()
        reused = conn is not None
        if conn is None:
            conn = await self._connect()
        try:
            conn.begin(request)
            while conn.state == "head":
                if conn.error is not None:
                    raise conn.error
                await conn.wait()
        except TransportError as err:
            conn.abort()
            if reused and conn.received == 0 and not isinstance(err, StaleConnection):
                raise StaleConnection("a reused connection closed before the answer") from None
            raise
        except BaseException:
            conn.abort()
            raise
        return Response(conn, self)

    def _sweep(self, now: float) -> None:
        """Close the least recently used idle connections past their idle limit, or past the cap."""
        idle = self._idle
        while idle and (len(idle) > MAX_IDLE_PER_POOL or now - idle[0].idle_since > idle[0].idle_limit):
            idle.pop(0).abort()

    def _release(self, conn: _Conn) -> None:
        usable = conn.reusable and not conn.closed and not self._closed and conn.error is None
        if usable and conn.state == "body" and conn.framing == "chunked":
            # A stream whose last event has been read but whose closing chunk has not arrived yet
            # (it is usually in flight): keep reading, discard, and pool it when it ends, or close
            # it if that takes longer than DRAIN_TIMEOUT_S (a server that never finishes).
            conn.draining = True
            conn.body.clear()
            if conn.paused and conn.transport is not None:
                conn.paused = False
                conn.transport.resume_reading()
            self._draining.add(conn)
            conn.drain_timer = conn.loop.call_later(DRAIN_TIMEOUT_S, conn.abort)
            return
        if usable and conn.state == "done" and not conn.body and conn.idle_limit > 0:
            conn.state = "idle"
            conn.idle_since = now = time.monotonic()
            self._idle.append(conn)
            self._sweep(now)
        else:
            conn.abort()

    def _drained(self, conn: _Conn) -> None:
        """A draining connection reached its end, broke, or ran out of time."""
        conn.draining = False
        if conn.drain_timer is not None:
            conn.drain_timer.cancel()
            conn.drain_timer = None
        self._draining.discard(conn)
        self._release(conn)

    async def aclose(self) -> None:
        self._closed = True
        for conn in (*self._idle, *self._draining):
            conn.abort()
        self._idle.clear()
