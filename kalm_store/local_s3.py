"""Local S3-compatible servers and the latency proxy, each in a process of its own on 127.0.0.1.

A benchmark that runs the object-store server and :mod:`kalm_store.latency_proxy` as threads of its own
Python process measures its own GIL: the server's and the proxy's request handling wait behind torch and
Lance's Python callbacks, and a burst of parallel reads is answered one after another. Here each runs as
a child process, bound to 127.0.0.1, started within ``startup_timeout`` seconds or failed with its log,
and bounded in time twice: :meth:`ServerProcess.stop` (or leaving the ``with`` block) ends its process
group (SIGTERM, then SIGKILL), and the child itself runs under coreutils ``timeout`` so that it exits
after ``max_seconds`` even when the parent is killed before it can stop it.

Two servers:

- ``moto``: ``python -m moto.server`` (the project's ``s3`` extra: ``pip install "kalm-store[s3]"``);
- ``s3rver``: the npm package ``s3rver`` (Node; ``npm install -g s3rver@3.7.1``), which serves ranged GETs
  from files with Node's asynchronous IO, so a burst of parallel reads is served concurrently.

Both speak path-style S3 over plain HTTP: Lance needs ``allow_http`` and no virtual-hosted-style requests
(its default), see :func:`s3_storage_options`. Lance's reads and writes (PUT, ranged GET, HEAD, LIST of a
prefix) work against both; s3rver 3.7.1's LIST with a delimiter does not report a common prefix whose
objects all lie two or more folders down (its directory walk prunes them), which is how LanceDB lists
tables: :func:`mark_listable` puts one empty object in each table folder so that it is listed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from kalm_store.latency_proxy import RemoteProxy

SERVERS = ("moto", "s3rver")
# s3rver checks signatures against this pair (its default account); moto takes any
CREDENTIALS = {"moto": ("testing", "testing"), "s3rver": ("S3RVER", "S3RVER")}


def free_port() -> int:
    """A port on 127.0.0.1 free right now (the child binds it next: a race only another binder could win)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A child process serving HTTP on ``127.0.0.1:port``, started with :meth:`start`, ended with :meth:`stop`.

    Parameters
    ----------
    argv : list of str
        The command; it must bind 127.0.0.1 on ``port``.
    port : int
        Where it listens; :meth:`start` returns once a TCP connect there succeeds.
    name : str
        Named in errors.
    max_seconds : float
        The child is killed after this long whatever happens to the parent (coreutils ``timeout``).
    startup_timeout : float, default 30
        Seconds to wait for the port before giving up (the child is then stopped and its log shown).
    """

    def __init__(self, argv: list[str], port: int, *, name: str, max_seconds: float,
                 startup_timeout: float = 30.0) -> None:
        if max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0, got {max_seconds!r}")
        self.argv, self.port, self.name = list(argv), port, name
        self.max_seconds, self.startup_timeout = float(max_seconds), float(startup_timeout)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        bound = shutil.which("timeout")
        if bound is None:
            raise RuntimeError(f"{self.name}: coreutils 'timeout' is not on PATH; it bounds the child's lifetime")
        self._log = tempfile.TemporaryFile()
        # its own session: stop() signals the whole group (timeout and the server under it)
        self.proc = subprocess.Popen([bound, "-k", "5", f"{self.max_seconds:g}", *self.argv],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                log = self.log_tail()
                self.stop()
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode} before listening on "
                                   f"{self.url}: {log}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    log = self.log_tail()
                    self.stop()
                    raise RuntimeError(f"{self.name} did not listen on {self.url} within "
                                       f"{self.startup_timeout:g} s: {log}") from None
                time.sleep(0.05)

    def log_tail(self, chars: int = 2000) -> str:
        """The last ``chars`` of what the child printed (stdout and stderr), for error messages."""
        if self._log is None:
            return ""
        self._log.seek(0)
        text = self._log.read().decode(errors="replace").strip()
        return text[-chars:] or "(it printed nothing)"

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM to the child's process group, SIGKILL after ``timeout`` seconds; idempotent."""
        if self.proc is not None and self.proc.returncode is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break  # already gone
                try:
                    self.proc.wait(timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
            self.proc.wait(timeout)  # reaped: no zombie left for the parent's lifetime
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def s3rver_command() -> str:
    """The ``s3rver`` executable, or a RuntimeError that says how to get it."""
    found = shutil.which("s3rver")
    if found is None:
        raise RuntimeError("--s3-server s3rver needs the npm package s3rver (Node.js >= 8.3) on PATH: "
                           "npm install -g s3rver@3.7.1 (or use --s3-server moto, from the s3 extra)")
    return found


def start_server(kind: str, *, max_seconds: float, directory: str | Path | None = None) -> ServerProcess:
    """Start a local S3-compatible server of ``kind`` (``moto`` or ``s3rver``) on a free 127.0.0.1 port.

    ``directory`` is where s3rver keeps its objects (a new temporary folder when None; moto keeps them in
    memory). The caller creates buckets (with :data:`CREDENTIALS`) and stops the server."""
    port = free_port()
    if kind == "moto":
        try:
            import moto.server  # noqa: F401 - only checking that the extra is there
        except ImportError as e:
            raise RuntimeError(f'--s3-server moto needs moto[server]: pip install "kalm-store[s3]" ({e})') from e
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    elif kind == "s3rver":
        folder = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="kalm-s3rver-"))
        argv = [s3rver_command(), "--directory", str(folder), "--address", "127.0.0.1", "--port", str(port),
                "--silent", "--no-vhost-buckets"]
    else:
        raise ValueError(f"unknown S3 server {kind!r}: choose one of {', '.join(SERVERS)}")
    return ServerProcess(argv, port, name=kind, max_seconds=max_seconds).start()


def start_proxy(upstream: str, *, max_seconds: float, latency_ms: float = 0.0,
                timeout: float = 30.0) -> tuple[ServerProcess, RemoteProxy]:
    """:mod:`kalm_store.latency_proxy` in a process of its own in front of ``upstream``: the process (to
    stop) and a :class:`~kalm_store.latency_proxy.RemoteProxy` that drives it."""
    port = free_port()
    argv = [sys.executable, "-m", "kalm_store.latency_proxy", upstream, "--port", str(port),
            "--latency-ms", f"{latency_ms!r}", "--max-seconds", f"{max_seconds:g}", "--timeout", f"{timeout:g}"]
    proc = ServerProcess(argv, port, name="latency proxy", max_seconds=max_seconds + 10).start()
    return proc, RemoteProxy(proc.url, timeout=timeout)


LISTING_MARKER = "_s3rver_listing_marker"  # not a name Lance reads: data, _versions, _indices, _transactions...


def mark_listable(client: Any, bucket: str, folder: str) -> None:
    """Make ``folder`` (a table folder such as ``db/docs.lance``) show up in s3rver's delimited LIST, as the
    common prefix LanceDB's table listing looks for (see the module's note): one empty object in it.
    ``client`` is a boto3 S3 client for the server."""
    client.put_object(Bucket=bucket, Key=f"{folder.strip('/')}/{LISTING_MARKER}", Body=b"")


def s3_storage_options(kind: str, endpoint: str) -> dict[str, str]:
    """Lance/LanceDB storage options for a local ``kind`` server at ``endpoint`` (path style, plain HTTP)."""
    key, secret = CREDENTIALS[kind]
    return {"endpoint": endpoint, "region": "us-east-1", "aws_access_key_id": key,
            "aws_secret_access_key": secret, "allow_http": "true"}


__all__ = ["CREDENTIALS", "LISTING_MARKER", "SERVERS", "mark_listable", "ServerProcess", "free_port", "s3_storage_options", "s3rver_command",
           "start_proxy", "start_server"]
