"""kalm_store.local_s3: the S3 server and the latency proxy of ``bench_query.py --s3``, each in a process of
its own on 127.0.0.1, started, driven, bounded in time and stopped.

The proxy and process tests need only the standard library (a stdlib HTTP server stands upstream); the
moto test needs the ``s3`` extra, and the s3rver test the npm package ``s3rver``, which the README's test
command does not install: without it that test skips with its reason (CI has no npm).
"""

from __future__ import annotations

import http.client
import shutil
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kalm_store.latency_proxy import RemoteProxy, round_trips
from kalm_store.local_s3 import ServerProcess, free_port, s3_storage_options, start_proxy, start_server

pytestmark = pytest.mark.slow


@pytest.fixture
def upstream():
    """A stdlib HTTP server on 127.0.0.1 answering every GET with its path, in a thread of this process."""

    class Echo(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 - the base class's naming
            body = f"got {self.path}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _get(url: str, path: str) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        return True


def test_proxy_process_adds_latency_records_and_stops(upstream):
    proc, proxy = start_proxy(upstream, max_seconds=60, latency_ms=0, timeout=10)
    try:
        assert proxy.url == proc.url and proxy.url.startswith("http://127.0.0.1:")
        proxy.latency_ms = 120
        assert proxy.latency_ms == 120.0
        t = time.perf_counter()
        assert _get(proxy.url, "/bucket/key") == (200, b"got /bucket/key")  # forwarded to the upstream
        assert time.perf_counter() - t >= 0.12
        (req,) = proxy.snapshot()  # the control calls above and below are not recorded
        assert (req.method, req.path, req.status) == ("GET", "/bucket/key", 200) and req.ms >= 120
        assert req.connection > 0 and proxy.upstream_connections == 1
        proxy.reset()
        proxy.latency_ms = 0
        for i in range(3):  # one after another: three round trips, each on a connection of its own here
            _get(proxy.url, f"/bucket/k{i}")
        reqs = proxy.snapshot()
        assert [r.path for r in reqs] == ["/bucket/k0", "/bucket/k1", "/bucket/k2"] and round_trips(reqs) == 3
        assert proxy.count("GET") == 3 and proxy.upstream_connections == 4
        with pytest.raises(ValueError, match="latency_ms must be >= 0"):
            proxy.latency_ms = -5  # the client refuses a negative value itself...
        with pytest.raises(RuntimeError, match=r"PUT /_proxy/latency\?ms=-1.0 answered 400: .*ms=NUMBER >= 0"):
            proxy._call("PUT", "latency?ms=-1.0")  # ...and so does the proxy
        assert _get(proxy.url, "/_proxy/nothing")[0] == 404 and proxy.count() == 3
    finally:
        proc.stop()
    assert proc.proc.returncode is not None and _refused(proc.port)
    proc.stop()  # idempotent


def test_server_process_is_bounded_in_time_and_reports_failures():
    port = free_port()
    # a server that would run forever: ended by its own bound, without stop()
    proc = ServerProcess([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)], port,
                         name="http.server", max_seconds=2).start()
    try:
        assert _get(proc.url, "/")[0] == 200
        deadline = time.monotonic() + 15
        while proc.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.proc.returncode is not None and _refused(port)
    finally:
        proc.stop()
    bad = ServerProcess([sys.executable, "-c", "import sys; print('no such bucket folder'); sys.exit(3)"],
                        free_port(), name="broken server", max_seconds=30)
    with pytest.raises(RuntimeError, match="broken server exited with status 3 before listening on "
                                           "http://127.0.0.1:[0-9]+: no such bucket folder"):
        bad.start()
    silent = ServerProcess([sys.executable, "-c", "import time; time.sleep(30)"], free_port(), name="mute",
                           max_seconds=30, startup_timeout=1)
    with pytest.raises(RuntimeError, match=r"mute did not listen on .* within 1 s: \(it printed nothing\)"):
        silent.start()
    assert silent.proc.returncode is not None  # stopped, not left behind
    with pytest.raises(ValueError, match="unknown S3 server 'minio'"):
        start_server("minio", max_seconds=10)
    with pytest.raises(ValueError, match="max_seconds must be > 0"):
        ServerProcess(["true"], 1, name="x", max_seconds=0)


def test_missing_s3rver_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    with pytest.raises(RuntimeError, match=r"npm install -g s3rver@3\.7\.1 .*--s3-server moto"):
        start_server("s3rver", max_seconds=10)


def _lance_round_trip(kind: str, tmp_path) -> None:
    """Write a two-fragment Lance dataset to a ``kind`` server process, index and delete, then take rows from
    both fragments through a proxy process: the reads Lance's object_store needs (PUT, multipart-free
    commits, LIST, HEAD, ranged GET) all work, and the proxy counts them."""
    boto3 = pytest.importorskip("boto3", reason='boto3 is not installed: pip install "kalm-store[s3]"')
    import lance
    import numpy as np
    import pyarrow as pa

    from kalm_store.local_s3 import CREDENTIALS

    server = start_server(kind, max_seconds=120, directory=tmp_path / "bucket")
    proc = None
    try:
        key, secret = CREDENTIALS[kind]
        boto3.client("s3", endpoint_url=server.url, region_name="us-east-1", aws_access_key_id=key,
                     aws_secret_access_key=secret).create_bucket(Bucket="kalm-test")
        uri, opts = "s3://kalm-test/db/t.lance", s3_storage_options(kind, server.url)
        blobs = [bytes([i]) * 5000 for i in range(40)]
        for part in (0, 1):  # two commits: two fragments
            lance.write_dataset(pa.table({"id": [f"p{part}-{i}" for i in range(20)], "x": blobs[part * 20:][:20]}),
                                uri, storage_options=opts, mode="append")
        ds = lance.dataset(uri, storage_options=opts)
        ds.create_scalar_index("id", "BTREE")
        import lancedb

        from kalm_store.local_s3 import mark_listable

        db = lancedb.connect("s3://kalm-test/db", storage_options=opts)
        # LanceDB lists tables with a delimited LIST; s3rver 3.7.1's misses folders with no object of their own
        assert db.list_tables().tables == ([] if kind == "s3rver" else ["t"])
        mark_listable(boto3.client("s3", endpoint_url=server.url, region_name="us-east-1", aws_access_key_id=key,
                                   aws_secret_access_key=secret), "kalm-test", "db/t.lance")
        assert db.list_tables().tables == ["t"]
        assert lancedb.connect("s3://kalm-test/db", storage_options=opts).open_table("t").count_rows() == 40
        ds.delete("id = 'p0-3'")
        proc, proxy = start_proxy(server.url, max_seconds=120)
        ds = lance.dataset(uri, storage_options=s3_storage_options(kind, proxy.url))
        assert ds.count_rows() == 39 and len(ds.get_fragments()) == 2
        proxy.reset()
        got = ds.to_table(columns=["x"], filter="id IN ('p0-5', 'p1-7')").column("x").to_pylist()
        assert sorted(got) == [blobs[5], blobs[27]]
        reqs = proxy.snapshot()
        assert reqs and all(r.status in (200, 206) for r in reqs) and round_trips(reqs) >= 1
        assert any(r.range for r in reqs)  # ranged GETs of the data files
    finally:
        if proc is not None:
            proc.stop()
        server.stop()
    assert _refused(server.port)


def test_moto_process_serves_a_lance_dataset(tmp_path):
    pytest.importorskip("moto.server", reason='moto is not installed: pip install "kalm-store[s3]"')
    _lance_round_trip("moto", tmp_path)


@pytest.mark.skipif(shutil.which("s3rver") is None,
                    reason="s3rver (npm) is not on PATH: npm install -g s3rver@3.7.1; the README test command "
                           "does not install it")
def test_s3rver_process_serves_a_lance_dataset(tmp_path):
    _lance_round_trip("s3rver", tmp_path)


def test_remote_proxy_rejects_a_bad_url():
    with pytest.raises(ValueError, match="proxy url must look like http://host:port, got 'localhost'"):
        RemoteProxy("localhost")
