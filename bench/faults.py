"""Storage fault injection against real parts, for tests and bench/bench_faults.py (not shipped code paths).

* ``FaultProxy``: a real HTTP proxy (threads, HTTP/1.1 keep-alive) in front of a real S3 server (moto's server
  mode). At a given rate and seed it answers 500 InternalError, 503 ServiceUnavailable or 503 SlowDown (throttling),
  holds the request past the client's read timeout, or resets the connection -- before forwarding the request, or
  after the server has done it (the answer is lost: the client retries an operation that already happened).
  Which operations are hit is configurable: ``reads`` (GET/HEAD of an object), ``writes`` (PUT/POST/DELETE),
  ``lists`` (GET on the bucket).
* ``FaultyLocalFileSystem``: fsspec's local filesystem under the protocol ``faultfile://`` whose write, fsync and
  rename steps (the store's local-write hooks, ``Root._inject``) raise ENOSPC or EIO at a given rate.
* ``moto_server()``: a ThreadedMotoServer on a free port with a bucket, and its fsspec options.
"""
from __future__ import annotations

import contextlib
import errno
import http.client
import random
import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

S3_FAULTS = ("500", "503", "slowdown", "timeout", "reset", "reset_after")
OP_CLASSES = ("reads", "writes", "lists")

_ERROR_BODY = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{msg}</Message>'
               '<RequestId>fault</RequestId></Error>')


@dataclass
class FaultStats:
    requests: int = 0
    injected: dict = field(default_factory=dict)  # kind -> count
    by_op: dict = field(default_factory=dict)     # op class -> count of injected faults

    @property
    def total(self) -> int:
        return sum(self.injected.values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):  # a client that gave up (its timeout) is not news
        pass


class FaultProxy:
    """``FaultProxy(upstream="http://127.0.0.1:PORT", rate=0.05, seed=1)``; ``.endpoint`` is what clients use.
    ``hang_s`` should exceed the client's read timeout (``config_kwargs={"read_timeout": ...}``)."""

    def __init__(self, upstream: str, rate: float = 0.05, seed: int = 0, faults: tuple[str, ...] = S3_FAULTS,
                 ops: tuple[str, ...] = OP_CLASSES, hang_s: float = 3.0, port: int | None = None):
        host, _, up_port = upstream.removeprefix("http://").partition(":")
        self.upstream = (host, int(up_port))
        self.rate, self.faults, self.ops, self.hang_s = float(rate), tuple(faults), tuple(ops), float(hang_s)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.stats = FaultStats()
        self.enabled = True
        self.port = port or _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = _Server(("127.0.0.1", self.port), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _draw(self, op: str) -> str | None:
        with self._lock:
            self.stats.requests += 1
            if not self.enabled or op not in self.ops or self._rng.random() >= self.rate:
                return None
            kind = self._rng.choice(self.faults)
            self.stats.injected[kind] = self.stats.injected.get(kind, 0) + 1
            self.stats.by_op[op] = self.stats.by_op.get(op, 0) + 1
            return kind

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _op(self) -> str:
                path = self.path.split("?", 1)[0].strip("/")
                if self.command in ("PUT", "POST", "DELETE"):
                    return "writes"
                if self.command == "GET" and "/" not in path:
                    return "lists"
                return "reads"

            def _reset(self) -> None:
                # SO_LINGER 0: close() sends RST, the client sees "connection reset by peer"
                with contextlib.suppress(OSError):
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.close()

            def _error(self, status: int, code: str, msg: str) -> None:
                body = _ERROR_BODY.format(code=code, msg=msg).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                if code == "SlowDown":
                    self.send_header("Retry-After", "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._draw(self._op())
                if fault == "500":
                    return self._error(500, "InternalError", "injected internal error")
                if fault == "503":
                    return self._error(503, "ServiceUnavailable", "injected unavailability")
                if fault == "slowdown":
                    return self._error(503, "SlowDown", "Please reduce your request rate.")
                if fault == "timeout":
                    time.sleep(proxy.hang_s)
                    return self._reset()
                if fault == "reset":
                    return self._reset()
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding",)}
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if fault == "reset_after":  # the server did it; the client never hears
                    return self._reset()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        continue
                    self.send_header(k, v)
                if self.command == "HEAD":
                    self.send_header("Content-Length", resp.getheader("Content-Length") or "0")
                else:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler


# ---------------------------------------------------------------- a real S3 server (moto server mode)
@contextlib.contextmanager
def moto_server(bucket: str = "pairforge-faults", key: str = "testing", secret: str = "testing",
                port: int | None = None) -> Iterator[tuple[str, dict]]:
    """(endpoint, fsspec options) of a fresh ThreadedMotoServer with ``bucket`` created; keys passed explicitly."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = port or _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key,
                     aws_secret_access_key=secret).create_bucket(Bucket=bucket)
        yield endpoint, s3_options(endpoint, key, secret)
    finally:
        server.stop()


def s3_options(endpoint: str, key: str = "testing", secret: str = "testing", read_timeout: float | None = None,
               retries: int | None = None) -> dict:
    """fsspec/s3fs options for an endpoint and keys (no environment variables needed)."""
    opts: dict = {"key": key, "secret": secret, "skip_instance_cache": True, "use_listings_cache": False,
                  "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    config: dict = {}
    if read_timeout is not None:
        config.update(read_timeout=read_timeout, connect_timeout=read_timeout)
    if retries is not None:
        config["retries"] = {"max_attempts": retries, "mode": "standard"}
    if config:
        opts["config_kwargs"] = config
    return opts


# ---------------------------------------------------------------- a local filesystem that fails
class FaultyLocalFileSystem(LocalFileSystem):
    """``faultfile:///path``: the local filesystem, with ENOSPC/EIO raised by the store's write, fsync and rename
    steps at ``rate`` (seeded). ``ops`` picks the steps, ``kinds`` the errnos. ``full=True``: a full disk,
    every write fails with ENOSPC (flip ``fs.full`` to fill or free it)."""

    protocol = ("faultfile",)
    root_marker = "/"

    def __init__(self, rate: float = 0.05, seed: int = 0, ops: tuple[str, ...] = ("write", "fsync", "rename"),
                 kinds: tuple[str, ...] = ("EIO", "ENOSPC"), full: bool = False, **kw):
        super().__init__(**kw)
        self.rate, self.ops, self.kinds, self.full = float(rate), tuple(ops), tuple(kinds), bool(full)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.injected: dict[str, int] = {}

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith("faultfile://"):
            path = path[len("faultfile://"):]
        return LocalFileSystem._strip_protocol(path)

    def unstrip_protocol(self, name: str) -> str:
        return name  # the store and the card see plain local paths

    def inject_fault(self, op: str, path: str) -> None:
        """Called by ``store.root.Root._inject`` before each local write, fsync and rename."""
        import os

        if self.full and op == "write":  # a full disk: every write fails
            self._count("ENOSPC")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        if op not in self.ops:
            return
        with self._lock:
            if self._rng.random() >= self.rate:
                return
            name = self._rng.choice(self.kinds)
        self._count(name)
        code = getattr(errno, name)
        raise OSError(code, f"{os.strerror(code)} (injected on {op})", path)

    def _count(self, name: str) -> None:
        with self._lock:
            self.injected[name] = self.injected.get(name, 0) + 1


fsspec.register_implementation("faultfile", FaultyLocalFileSystem, clobber=True)


SMALL_CT_SPEC = """
name: {name}
samples: {samples}
shard_size: 2
seed: {seed}
image: {{size: 256, spacing_mm: [1.2, 1.4]}}
findings:
  negatives: 0.2
  mixture: ["8 mm solid nodule, right lower lobe"]
"""


def small_ct_spec(name: str, samples: int = 4, seed: int = 0) -> str:
    """A small chest-CT spec text (256 px, shards of 2) for storage, concurrency and fault runs."""
    return SMALL_CT_SPEC.format(name=name, samples=samples, seed=seed)


def small_ct_samples(text: str) -> dict:
    """The samples of a spec text, by index (made once, written by every build of a run)."""
    from flows.pipeline import make_samples
    from schemas.spec import load_spec_text, spec_hash

    spec = load_spec_text(text)
    return {s.index: s for s in make_samples(spec, range(spec.samples), digest=spec_hash(spec))}
