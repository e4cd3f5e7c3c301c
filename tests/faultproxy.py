"""A fault-injecting HTTP reverse proxy on loopback, to put in front of the test S3 server.

    with moto_server() as endpoint, fault_proxy(endpoint, error_rate=0.3, seed=1) as proxy:
        client = boto3.client("s3", endpoint_url=proxy.url, ...)
        ...                      # about 30% of requests get a 503 SlowDown
        proxy.error_rate = 0.0   # faults off from here on (thread-safe)
        assert proxy.errors_injected > 0

For each request the proxy reads the request line, the headers and the whole body (answering
``Expect: 100-continue`` first), then does one of three things:

* **error**: answers with an S3-style ``503 SlowDown`` XML error (``error_status``/``error_code`` change it:
  botocore backs off about 1 s on throttling codes such as SlowDown and about 50 ms on others such as a
  ``500 InternalError``);
* **drop**: closes the connection abruptly (a TCP reset) without sending a response, so the client sees
  "connection reset by peer" / "remote end closed connection";
* **forward**: sends the request to the upstream unchanged and relays the response.

Faults are chosen by one draw of a ``random.Random(seed)`` per request that may be faulted (see
``methods``), in the order requests arrive, so a single-threaded client sees the same faults on every run.

``phase`` says when a fault happens. ``"request"`` (default): instead of forwarding, so the upstream never
sees the request. ``"response"``: after forwarding, so the upstream *did* apply it (a PUT is stored) and only
its response is replaced by the fault -- the "response was lost" case that retries must survive.

Forwarding keeps the request as the client signed it: the method, the raw path and query, every header in
order, the ``Host`` header the client sent (the proxy's address, which SigV4 signs; rewriting it would break
signature checks), and the body with its framing (Content-Length, or chunked). Only hop-by-hop headers and
``Expect`` (which the proxy has already answered) are left off. The upstream's status, headers and body come
back unchanged, except hop-by-hop headers; a chunked upstream body is relayed with a Content-Length.

Standard library only.
"""

from __future__ import annotations

import http.client
import http.server
import random
import socket
import struct
import threading
import urllib.parse
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


def error_body(code: str = "SlowDown") -> bytes:
    """The XML body S3 sends with an error response."""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>injected</Message>'
            f"<RequestId>faultproxy</RequestId></Error>").encode()


# RFC 7230 section 6.1, plus Expect (answered here) and Proxy-Connection (a de-facto hop-by-hop header).
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "trailers", "upgrade", "expect",
})

FORWARD, ERROR, DROP = "forward", "error", "drop"
PHASES = ("request", "response")


@dataclass(frozen=True)
class Hit:
    """One request the proxy handled: what it did, and the status the client got (None when dropped)."""

    index: int
    method: str
    path: str
    outcome: str  # "forward", "error" or "drop"
    status: int | None
    expect_continue: bool
    chunked: bool


class FaultProxy:
    """The running proxy. Rates, ``fail_all``, ``methods`` and ``phase`` can be changed while it runs."""

    def __init__(self, upstream_url: str, *, error_rate: float = 0.0, drop_rate: float = 0.0, seed: int = 0,
                 fail_all: bool = False, methods: Iterable[str] | None = None, phase: str = "request",
                 error_status: int = 503, error_code: str = "SlowDown", upstream_timeout: float = 60.0):
        parsed = urllib.parse.urlsplit(upstream_url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream_url!r}")
        self.upstream_url = upstream_url
        self._upstream = (parsed.hostname, parsed.port or 80)
        self._upstream_timeout = upstream_timeout
        self._error_status = int(error_status)
        self._error_body = error_body(error_code)
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._error_rate = self._drop_rate = 0.0
        self._fail_all = False
        self._methods: frozenset[str] | None = None
        self._phase = "request"
        self.configure(error_rate=error_rate, drop_rate=drop_rate, fail_all=fail_all, methods=methods, phase=phase)
        self._requests = self._errors = self._drops = self._forwarded = 0
        self._hits: list[Hit] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- settings --------------------------------------------------------------------------------------------

    _UNSET = object()

    def configure(self, *, error_rate=_UNSET, drop_rate=_UNSET, fail_all=_UNSET, methods=_UNSET,
                  phase=_UNSET) -> None:
        """Change several settings at once, atomically with respect to requests in flight."""
        with self._lock:
            new_error = self._error_rate if error_rate is self._UNSET else float(error_rate)
            new_drop = self._drop_rate if drop_rate is self._UNSET else float(drop_rate)
            if not (0.0 <= new_error <= 1.0 and 0.0 <= new_drop <= 1.0 and new_error + new_drop <= 1.0):
                raise ValueError(f"need 0 <= error_rate, drop_rate and their sum <= 1, got {new_error}, {new_drop}")
            new_phase = self._phase if phase is self._UNSET else phase
            if new_phase not in PHASES:
                raise ValueError(f"phase must be one of {PHASES}, got {new_phase!r}")
            self._error_rate, self._drop_rate, self._phase = new_error, new_drop, new_phase
            if fail_all is not self._UNSET:
                self._fail_all = bool(fail_all)
            if methods is not self._UNSET:
                self._methods = None if methods is None else frozenset(m.upper() for m in methods)

    def _setting(name):  # noqa: N805 -- builds properties below
        def get(self):
            with self._lock:
                return getattr(self, "_" + name)

        def set_(self, value):
            self.configure(**{name: value})

        return property(get, set_)

    error_rate = _setting("error_rate")
    drop_rate = _setting("drop_rate")
    fail_all = _setting("fail_all")
    methods = _setting("methods")
    phase = _setting("phase")
    del _setting

    def faults_off(self) -> None:
        """Stop injecting faults; every request is forwarded from now on."""
        self.configure(error_rate=0.0, drop_rate=0.0, fail_all=False)

    # -- counters --------------------------------------------------------------------------------------------

    # With phase="request", requests == errors_injected + drops_injected + forwarded (a 502 for an unreachable
    # upstream aside, which shows only in `hits`). With phase="response", faulted requests count as forwarded too.

    @property
    def requests(self) -> int:
        """Requests received."""
        with self._lock:
            return self._requests

    @property
    def errors_injected(self) -> int:
        with self._lock:
            return self._errors

    @property
    def drops_injected(self) -> int:
        with self._lock:
            return self._drops

    @property
    def forwarded(self) -> int:
        """Requests sent to the upstream (with phase="response", faulted ones count here too)."""
        with self._lock:
            return self._forwarded

    @property
    def hits(self) -> list[Hit]:
        """Every handled request, in the order they finished."""
        with self._lock:
            return list(self._hits)

    def stats(self) -> dict[str, int]:
        """A consistent snapshot of all counters."""
        with self._lock:
            return {"requests": self._requests, "errors_injected": self._errors, "drops_injected": self._drops,
                    "forwarded": self._forwarded}

    def reset_counters(self) -> None:
        with self._lock:
            self._requests = self._errors = self._drops = self._forwarded = 0
            self._hits.clear()

    # -- lifecycle -------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        if self._server is not None:
            raise RuntimeError("already started")
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"faultproxy:{self._server.server_address[1]}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, cut open connections (idle keep-alive ones too) and wait for handler threads."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()  # no more accepts
        server.close_connections()  # wakes handler threads blocked reading from idle keep-alive connections
        server.server_close()
        server.join_handlers(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- per request (called from handler threads) -----------------------------------------------------------

    def _decide(self, method: str) -> tuple[str, str]:
        """Count the request and choose its outcome and phase."""
        with self._lock:
            self._requests += 1
            if self._methods is not None and method.upper() not in self._methods:
                return FORWARD, self._phase
            if self._fail_all:
                return ERROR, self._phase
            draw = self._rng.random()
            if draw < self._error_rate:
                return ERROR, self._phase
            if draw < self._error_rate + self._drop_rate:
                return DROP, self._phase
            return FORWARD, self._phase

    def _record(self, hit_args: dict, *, forwarded: bool) -> None:
        with self._lock:
            if forwarded:
                self._forwarded += 1
            if hit_args["outcome"] == ERROR:
                self._errors += 1
            elif hit_args["outcome"] == DROP:
                self._drops += 1
            self._hits.append(Hit(index=len(self._hits), **hit_args))


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() joins the handler threads itself, with a timeout
    allow_reuse_address = False  # port 0, never rebinding a fixed port

    def __init__(self, address, handler, proxy: FaultProxy):
        self.proxy = proxy
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        self._handlers: list[threading.Thread] = []
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                  name=f"faultproxy-conn:{self.server_address[1]}", daemon=True)
        with self._open_lock:
            self._handlers = [t for t in self._handlers if t.is_alive()]
            self._handlers.append(thread)
        thread.start()

    def join_handlers(self, timeout: float) -> None:
        with self._open_lock:
            threads = list(self._handlers)
        for thread in threads:
            thread.join(timeout=timeout)

    def track(self, sock: socket.socket, is_open: bool) -> None:
        with self._open_lock:
            (self._open.add if is_open else self._open.discard)(sock)

    def close_connections(self) -> None:
        with self._open_lock:
            socks = list(self._open)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and needed for Expect: 100-continue handling
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.track(self.connection, True)

    def finish(self) -> None:
        self.server.track(self.connection, False)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format, *args) -> None:  # noqa: A002 -- the stdlib's signature
        pass

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (OSError, ValueError):  # the client went away, or sent a malformed chunked body
            self.close_connection = True

    # BaseHTTPRequestHandler dispatches on do_<METHOD>; every method takes the same path.
    def __getattr__(self, name: str):
        if name.startswith("do_"):
            return self._proxy_request
        raise AttributeError(name)

    def _proxy_request(self) -> None:
        proxy = self.server.proxy
        method = self.command
        outcome, phase = proxy._decide(method)
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        expect = self.headers.get("Expect", "").lower() == "100-continue"
        body = self._read_body(chunked)  # the 100 Continue, if asked for, went out in parse_request
        hit = {"method": method, "path": self.path, "outcome": outcome, "expect_continue": expect,
               "chunked": chunked}

        forwarded = False
        response = None
        if outcome == FORWARD or phase == "response":
            try:
                response = self._forward(method, body, chunked)
                forwarded = True
            except (OSError, http.client.HTTPException) as exc:
                if outcome == FORWARD:
                    message = f"faultproxy: upstream {proxy.upstream_url} failed: {exc!r}".encode()
                    self._send(502, [("Content-Type", "text/plain")], message, method)
                    proxy._record({**hit, "status": 502}, forwarded=False)
                    return
        if outcome == DROP:
            proxy._record({**hit, "status": None}, forwarded=forwarded)
            self._drop()
            return
        if outcome == ERROR:
            proxy._record({**hit, "status": proxy._error_status}, forwarded=forwarded)
            self._send(proxy._error_status, [("Content-Type", "application/xml")], proxy._error_body, method)
            return
        status, headers, payload = response
        proxy._record({**hit, "status": status}, forwarded=True)
        self._send(status, headers, payload, method, keep_length=True)

    def _read_body(self, chunked: bool) -> bytes:
        if chunked:
            parts = []
            while True:
                size_line = self.rfile.readline(65537)
                if not size_line:
                    raise ConnectionError("client closed inside a chunked body")
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    break
                parts.append(self._read_exactly(size))
                self.rfile.readline(65537)  # the CRLF after the chunk
            while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):  # trailers: read and discard
                pass
            return b"".join(parts)
        length = self.headers.get("Content-Length")
        return self._read_exactly(int(length)) if length else b""

    def _read_exactly(self, size: int) -> bytes:
        data = self.rfile.read(size)
        if len(data) != size:
            raise ConnectionError("client closed inside the request body")
        return data

    def _forward(self, method: str, body: bytes, chunked: bool) -> tuple[int, list[tuple[str, str]], bytes]:
        host, port = self.server.proxy._upstream
        conn = http.client.HTTPConnection(host, port, timeout=self.server.proxy._upstream_timeout)
        try:
            # Send the request exactly as the client framed and signed it: no Host or Accept-Encoding added.
            conn.putrequest(method, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() in _HOP_BY_HOP or (chunked and name.lower() == "content-length"):
                    continue
                conn.putheader(name, value)
            if chunked:
                conn.endheaders(body, encode_chunked=True)  # re-framed as one chunk (or none) and the last
            else:
                conn.endheaders(body or None)
            response = conn.getresponse()
            payload = response.read()
            headers = [(name, value) for name, value in response.getheaders()
                       if name.lower() not in _HOP_BY_HOP and name.lower() != "transfer-encoding"]
            if response.chunked or response.getheader("Content-Length") is None:
                headers = [(n, v) for n, v in headers if n.lower() != "content-length"]
                if method != "HEAD":
                    headers.append(("Content-Length", str(len(payload))))
            return response.status, headers, payload
        finally:
            conn.close()

    def _send(self, status: int, headers: list[tuple[str, str]], payload: bytes, method: str,
              keep_length: bool = False) -> None:
        """Write the whole response in one send (no Nagle / delayed-ACK stalls)."""
        reason = self.responses.get(status, ("",))[0]
        lines = [f"HTTP/1.1 {status} {reason}"]
        lines += [f"{name}: {value}" for name, value in headers
                  if keep_length or name.lower() != "content-length"]
        if not keep_length:
            lines.append(f"Content-Length: {len(payload)}")
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
        self.wfile.write(head if no_body else head + payload)

    def _drop(self) -> None:
        """Close the connection with a TCP reset and no response."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.server.track(self.connection, False)
        # The socket really closes (sending RST) once rfile, which holds a reference to it, is closed too.
        self.connection.close()
        self.rfile.close()


@contextmanager
def fault_proxy(upstream_url: str, *, error_rate: float = 0.0, drop_rate: float = 0.0, seed: int = 0,
                fail_all: bool = False, methods: Iterable[str] | None = None, phase: str = "request",
                error_status: int = 503, error_code: str = "SlowDown") -> Iterator[FaultProxy]:
    """Run a `FaultProxy` in front of `upstream_url` on 127.0.0.1 and a free port; yields it.

    error_rate, drop_rate: the chance that a request gets an error or is dropped (one draw for both).
    seed: seeds the draws, taken in the order requests arrive.
    fail_all: every request (that ``methods`` allows) gets an error; no draw is taken.
    methods: only requests with these HTTP methods can be faulted (e.g. ``{"PUT"}``); None means all.
    phase: "request" faults instead of forwarding; "response" forwards first, then faults the response.
    """
    proxy = FaultProxy(upstream_url, error_rate=error_rate, drop_rate=drop_rate, seed=seed, fail_all=fail_all,
                       methods=methods, phase=phase, error_status=error_status, error_code=error_code)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
