"""An HTTP proxy on 127.0.0.1 that adds a fixed delay to every request and counts them.

It stands between an object-store client (Lance's Rust ``object_store``, boto3) and a local S3-compatible
server (moto, MinIO), so that a benchmark or a test can see what a store on a remote bucket costs: each
request waits ``latency_ms`` before it is forwarded, as if the server were that many milliseconds of
round trip away. Requests on different connections wait in parallel, as they would on a real network,
so a client that issues its reads concurrently pays the latency once per wave, not once per read.

Every request is recorded (method, path, ``Range`` header), which is how the tests prove how many round
trips a fetch of candidates takes. Standard library only; each connection gets a thread and one
keep-alive connection to the upstream server; :meth:`LatencyProxy.stop` (or leaving the ``with`` block)
shuts it down within ``timeout`` seconds.

Example::

    with LatencyProxy("http://127.0.0.1:5000", latency_ms=20) as proxy:
        opts = {"endpoint": proxy.url, ...}
        proxy.reset()
        ... read the store ...
        print(proxy.count(), proxy.requests[:3])
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

# hop-by-hop headers are the proxy's own business on each side (RFC 9110 7.6.1)
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass
class ProxiedRequest:
    """One request the proxy forwarded (recorded on arrival; ``ms`` and ``status`` are set when answered)."""

    method: str
    path: str
    range: str | None  # the ``Range`` header: a partial read of an object
    started: float  # time.perf_counter() when it arrived
    ms: float = float("nan")  # arrival to the start of the answer, added latency included
    status: int | None = None  # the upstream's HTTP status; None when forwarding failed


class LatencyProxy:
    """Forward HTTP requests to ``upstream`` after ``latency_ms``; record each one.

    Parameters
    ----------
    upstream : str
        ``http://host:port`` of the server behind the proxy.
    latency_ms : float, default 0
        Delay added to every request before it is forwarded (change it any time with :attr:`latency_ms`).
    port : int, default 0
        Port to listen on (127.0.0.1); 0 picks a free one (see :attr:`url`).
    timeout : float, default 30
        Seconds an upstream request or an idle client connection may take before it is dropped, so a
        stuck client cannot keep the proxy's threads alive.
    """

    def __init__(self, upstream: str, latency_ms: float = 0.0, *, port: int = 0, timeout: float = 30.0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or parts.port is None:
            raise ValueError(f"upstream must look like http://host:port, got {upstream!r}")
        if latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {latency_ms!r}")
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self.latency_ms = float(latency_ms)
        self.timeout = float(timeout)
        self.requests: list[ProxiedRequest] = []
        self._lock = threading.Lock()
        # Lance opens dozens of connections at once: the default backlog of 5 drops SYNs, and the client's
        # TCP retry (1 s, 3 s, 7 s...) would show up as seconds of "latency" the proxy never added
        server_class = type("Server", (ThreadingHTTPServer,), {"request_queue_size": 256})
        self._server = server_class(("127.0.0.1", port), _handler_for(self))
        self._server.daemon_threads = True  # a client that keeps its connection open does not block stop()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: the endpoint clients should use instead of the upstream's."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> LatencyProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="latency-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(self.timeout)

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ bookkeeping
    def reset(self) -> None:
        """Forget the requests recorded so far."""
        with self._lock:
            self.requests.clear()

    def record(self, request: ProxiedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def count(self, method: str | None = None) -> int:
        """Requests recorded since the last :meth:`reset` (of one ``method`` when given)."""
        with self._lock:
            return sum(1 for r in self.requests if method is None or r.method == method)

    def snapshot(self) -> list[ProxiedRequest]:
        with self._lock:
            return list(self.requests)


def round_trips(requests: list[ProxiedRequest]) -> int:
    """Sequential round trips in ``requests``: the longest chain of requests each of which arrived after
    the one before it had been answered. Requests a client issues together (in parallel) count once;
    a read that needs the answer of another (a file's footer, then its offsets, then its values) counts
    again. It does not depend on the added latency or on how fast the server is."""
    done: list[float] = []  # answer times of the requests seen so far, by arrival
    depth: list[int] = []
    out = 0
    for r in sorted(requests, key=lambda r: r.started):
        d = 1 + max((depth[i] for i, end in enumerate(done) if end <= r.started), default=0)
        done.append(r.started + r.ms / 1000.0)
        depth.append(d)
        out = max(out, d)
    return out


def _handler_for(proxy: LatencyProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as object-store clients expect
        timeout = proxy.timeout  # idle client connections close after this
        upstream: http.client.HTTPConnection | None = None

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass  # a benchmark's output is its table, not one line per request

        def _body(self) -> bytes | None:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()  # CRLF after the chunk
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else None

        def _forward(self) -> None:
            arrived = time.perf_counter()
            # recorded on arrival, so that a reset() after the client has its answer cannot be followed by
            # this request's record
            entry = ProxiedRequest(self.command, self.path, self.headers.get("Range"), arrived)
            proxy.record(entry)
            try:
                self._relay(entry)
            finally:
                if entry.status is None:  # failed before answering
                    entry.ms = (time.perf_counter() - arrived) * 1000.0

        def _relay(self, entry: ProxiedRequest) -> None:
            arrived = entry.started
            body = self._body()
            delay = proxy.latency_ms / 1000.0 - (time.perf_counter() - arrived)
            if delay > 0:
                time.sleep(delay)  # the round trip the bucket is away
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            if body is not None:
                headers["Content-Length"] = str(len(body))
            for attempt in (0, 1):  # the upstream may have closed an idle keep-alive connection: retry once
                if self.upstream is None:
                    self.upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port,
                                                               timeout=proxy.timeout)
                try:
                    self.upstream.request(self.command, self.path, body=body, headers=headers)
                    resp = self.upstream.getresponse()
                    data = resp.read()
                    break
                except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest):
                    self.upstream.close()
                    self.upstream = None
                    if attempt:
                        raise
            # answered from here on: set before the first byte goes out, so that a request the client sends
            # after reading this answer always arrives after this one's end (round_trips relies on it)
            entry.ms, entry.status = (time.perf_counter() - arrived) * 1000.0, resp.status
            self.send_response_only(resp.status, resp.reason)
            head = self.command == "HEAD"  # its Content-Length is the object's size, not this empty body's
            for k, v in resp.getheaders():
                if k.lower() not in _HOP and (head or k.lower() != "content-length"):
                    self.send_header(k, v)
            if not head:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            self.wfile.flush()

        def finish(self) -> None:
            if self.upstream is not None:
                self.upstream.close()
            super().finish()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler


__all__ = ["LatencyProxy", "ProxiedRequest", "round_trips"]
