"""An HTTP proxy on 127.0.0.1 that adds a fixed delay to every request and counts them.

It stands between an object-store client (Lance's Rust ``object_store``, boto3) and a local S3-compatible
server (moto, MinIO), so that a benchmark or a test can see what a store on a remote bucket costs: each
request waits ``latency_ms`` before it is forwarded, as if the server were that many milliseconds of
round trip away. Requests on different connections wait in parallel, as they would on a real network,
so a client that issues its reads concurrently pays the latency once per wave, not once per read.

Every request is recorded (method, path, ``Range`` header, client connection), which is how the tests
prove how many round trips a fetch of candidates takes. Standard library only; each client connection
gets a thread and one keep-alive connection to the upstream server, reused for every request on it;
:meth:`LatencyProxy.stop` (or leaving the ``with`` block) shuts it down within ``timeout`` seconds.

A benchmark runs the proxy in a process of its own (``python -m kalm_store.latency_proxy UPSTREAM``, see
:func:`main` and :func:`kalm_store.local_s3.start_proxy`), so that its threads do not share a GIL with the
client it measures; :class:`RemoteProxy` then sets its latency and reads its records over HTTP, through
paths under ``/_proxy/`` that are never forwarded nor recorded (an S3 bucket name cannot start with ``_``).

Example::

    with LatencyProxy("http://127.0.0.1:5000", latency_ms=20) as proxy:
        opts = {"endpoint": proxy.url, ...}
        proxy.reset()
        ... read the store ...
        print(proxy.count(), proxy.requests[:3])
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

# hop-by-hop headers are the proxy's own business on each side (RFC 9110 7.6.1)
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
CONTROL = "/_proxy/"  # the proxy's own paths: latency, reset, records (never forwarded, never recorded)


@dataclass
class ProxiedRequest:
    """One request the proxy forwarded (recorded on arrival; ``ms`` and ``status`` are set when answered)."""

    method: str
    path: str
    range: str | None  # the ``Range`` header: a partial read of an object
    started: float  # time.perf_counter() when it arrived
    ms: float = float("nan")  # arrival to the start of the answer, added latency included
    status: int | None = None  # the upstream's HTTP status; None when forwarding failed
    connection: int = 0  # the client connection it came on (its port on the client's side)


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
        self.upstream_connections = 0  # opened to the upstream since start (one per client connection, reused)
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

    def opened_upstream(self) -> None:
        with self._lock:
            self.upstream_connections += 1


class RemoteProxy:
    """A :class:`LatencyProxy` running in another process (``python -m kalm_store.latency_proxy``), driven
    over its ``/_proxy/`` paths: the same :attr:`url`, :attr:`latency_ms`, :meth:`reset`, :meth:`count`
    and :meth:`snapshot` as the in-process proxy, so a benchmark uses either."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or parts.port is None:
            raise ValueError(f"proxy url must look like http://host:port, got {url!r}")
        self.url = f"http://{parts.hostname}:{parts.port}"
        self._host, self._port, self._timeout = parts.hostname, parts.port, timeout

    def _call(self, method: str, what: str) -> Any:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        try:
            conn.request(method, CONTROL + what)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise RuntimeError(f"latency proxy at {self.url}: {method} {CONTROL}{what} answered {resp.status}: "
                               f"{body[:200]!r}")
        return json.loads(body)

    @property
    def latency_ms(self) -> float:
        return float(self._call("GET", "state")["latency_ms"])

    @latency_ms.setter
    def latency_ms(self, value: float) -> None:
        if value < 0:
            raise ValueError(f"latency_ms must be >= 0, got {value!r}")
        self._call("PUT", f"latency?ms={float(value)!r}")

    @property
    def upstream_connections(self) -> int:
        return int(self._call("GET", "state")["upstream_connections"])

    def reset(self) -> None:
        self._call("POST", "reset")

    def snapshot(self) -> list[ProxiedRequest]:
        return [ProxiedRequest(**r) for r in self._call("GET", "requests")]

    def count(self, method: str | None = None) -> int:
        return sum(1 for r in self.snapshot() if method is None or r.method == method)


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

        def _control(self) -> None:
            """The proxy's own paths (RemoteProxy): answered here, not forwarded, not recorded."""
            what = urlsplit(self.path)
            name = what.path[len(CONTROL):]
            if (self.command, name) == ("GET", "state"):
                out: Any = dict(latency_ms=proxy.latency_ms, upstream_connections=proxy.upstream_connections)
            elif (self.command, name) == ("GET", "requests"):
                out = [asdict(r) for r in proxy.snapshot()]
            elif (self.command, name) == ("POST", "reset"):
                proxy.reset()
                out = {}
            elif (self.command, name) == ("PUT", "latency"):
                try:
                    ms = float(parse_qs(what.query)["ms"][0])
                except (KeyError, ValueError):
                    ms = -1.0
                if ms < 0:
                    self._reply(400, {"error": f"latency needs ?ms=NUMBER >= 0, got {what.query!r}"})
                    return
                proxy.latency_ms = ms
                out = {}
            else:
                self._reply(404, {"error": f"no such proxy call: {self.command} {what.path}"})
                return
            self._reply(200, out)

        def _reply(self, status: int, out: Any) -> None:
            data = json.dumps(out).encode()
            self.send_response_only(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()

        def _forward(self) -> None:
            arrived = time.perf_counter()
            if self.path.startswith(CONTROL):
                self._body()  # read whatever was sent, so the connection stays usable
                self._control()
                return
            # recorded on arrival, so that a reset() after the client has its answer cannot be followed by
            # this request's record
            entry = ProxiedRequest(self.command, self.path, self.headers.get("Range"), arrived,
                                   connection=self.client_address[1])
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
                    proxy.opened_upstream()
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


def main(argv: list[str] | None = None) -> int:
    """``python -m kalm_store.latency_proxy UPSTREAM [--port P] [--latency-ms MS] [--max-seconds S]``: serve
    the proxy on 127.0.0.1 until SIGTERM/SIGINT or ``--max-seconds``, whichever comes first (a benchmark
    that dies leaves no proxy behind for longer than that). Prints ``listening on URL`` once it accepts."""
    p = argparse.ArgumentParser(prog="python -m kalm_store.latency_proxy", description=main.__doc__)
    p.add_argument("upstream", help="http://host:port of the S3-compatible server")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="added delay per request (default: 0)")
    p.add_argument("--max-seconds", type=float, default=3600.0, help="exit after this long (default: 3600)")
    p.add_argument("--timeout", type=float, default=30.0, help="upstream/idle-connection timeout (default: 30)")
    args = p.parse_args(argv)
    if args.max_seconds <= 0:
        p.error(f"--max-seconds must be > 0, got {args.max_seconds}")
    try:
        proxy = LatencyProxy(args.upstream, args.latency_ms, port=args.port, timeout=args.timeout)
    except (ValueError, OSError) as e:
        p.error(str(e))
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    proxy.start()
    print(f"listening on {proxy.url}", flush=True)
    done.wait(args.max_seconds)
    proxy.stop()
    return 0


__all__ = ["LatencyProxy", "ProxiedRequest", "RemoteProxy", "main", "round_trips"]


if __name__ == "__main__":
    sys.exit(main())
