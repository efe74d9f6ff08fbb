"""A real `bentoml serve` process on 127.0.0.1, for the tests and the benchmarks."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.polling import poll

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def own_home(home: Path) -> Path:
    """A BentoML home of the server's own that shares the store's models and bentos: BentoML
    clears `$BENTOML_HOME/prometheus_multiproc_dir` whenever a server starts, so servers that
    shared a home would wipe each other's metrics."""
    shared = Path(os.environ["BENTOML_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    for store in ("models", "bentos"):
        (shared / store).mkdir(parents=True, exist_ok=True)
        if not (home / store).exists():
            (home / store).symlink_to(shared / store, target_is_directory=True)
    return home


class Server:
    """A real `bentoml serve` process on 127.0.0.1 (`host` another address only for a server
    that must refuse to start)."""

    def __init__(self, env: dict[str, str], log_path: Path, target: str = "service:SDXL", host: str = "127.0.0.1"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.started = time.monotonic()
        park = env.get("SDXL_TEST_PARK_FILE")  # (the test servers': conftest's `serve`)
        self.park_file = Path(park) if park else None
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", target, "--host", host, "--port", str(self.port)],
            # A bento is served from elsewhere: in this checkout, `bentoml serve` would read bentofile.yaml.
            cwd=ROOT if target == "service:SDXL" else log_path.parent,
            env={**os.environ, "BENTOML_HOME": str(own_home(log_path.parent / "bentoml")), **env},
            stdout=log_path.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 180) -> float:
        """Seconds from process start to /readyz answering 200."""

        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            poll(ready, timeout=timeout, every=0.3, what="/readyz")
        except TimeoutError:
            raise TimeoutError(f"server not ready in {timeout} s:\n{self.log()}") from None
        return time.monotonic() - self.started

    @contextlib.contextmanager
    def parked(self) -> Iterator[None]:
        """Within: the jobs whose prompt says "park" wait after their first step (the server's
        SDXL_TEST_PARK_FILE seam) until they are cancelled, stopped or timed out, or the block ends."""
        assert self.park_file is not None, "a server started without SDXL_TEST_PARK_FILE"
        self.park_file.touch()
        try:
            yield
        finally:
            self.park_file.unlink(missing_ok=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        """Asks the process group to shut down, without waiting."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)

    def kill(self) -> None:
        """kill -9 of the server and its workers (which BentoML starts in process groups of
        their own), as a node that dies takes them: no shutdown hook runs."""
        import psutil

        processes = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        for process in processes:
            process.kill()
        psutil.wait_procs(processes, timeout=60)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()


class RedisServer:
    """A real `redis-server` on 127.0.0.1 (Debian's package, which `make test` installs), in
    memory only; `stop()` and `start()` again on the same port stand for an outage."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=(self.folder / "redis.log").open("a"),
            stderr=subprocess.STDOUT,
        )

        def pongs() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as connection:
                    connection.sendall(b"PING\r\n")
                    return connection.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        poll(pongs, timeout=60, every=0.1, what=f"redis-server on port {self.port}")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(60)
            self.process = None


class TraceCollector:
    """An OTLP/HTTP trace collector on 127.0.0.1: keeps every span the servers export, decoded
    with OpenTelemetry's own protobuf classes, as a dict (name, trace and span ids as hex,
    parent, start and end in ns, attributes)."""

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        self.spans: list[dict] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                export = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["content-length"])))
                for resource in export.resource_spans:
                    for scope in resource.scope_spans:
                        collector.spans.extend(collector.decoded(span) for span in scope.spans)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def decoded(span) -> dict:
        return {
            "name": span.name,
            "trace_id": span.trace_id.hex(),
            "span_id": span.span_id.hex(),
            "parent_span_id": span.parent_span_id.hex(),
            "start": span.start_time_unix_nano,
            "end": span.end_time_unix_nano,
            "attributes": {a.key: a.value.string_value or a.value.int_value for a in span.attributes},
        }

    def stop(self) -> None:
        self.server.shutdown()


def start_that_fails(env: dict[str, str], log_path: Path, host: str = "127.0.0.1") -> Server:
    """A server started with `env` that should refuse to start: it is waited for (the
    process ends on its own) and returned, for its exit code and its log."""
    server = Server(env, log_path, host=host)
    try:
        server.process.wait(300)
    finally:
        server.stop()
    return server
