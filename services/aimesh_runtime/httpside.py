"""The HTTP side port: /metrics for Prometheus, /.well-known/jwks.json and others.

A small threaded stdlib server: these endpoints are read by scrapers and by
Envoy's JWKS fetch, never on a request's hot path, so a thread keeps them off
the event loop without another web framework.

The serving thread must be gone before the interpreter finalizes: a daemon
thread that wakes from select() then is ended with pthread_exit, which is
known to crash processes with C++ extensions loaded (CPython gh-87135).
stop() joins it, and an atexit hook stops a server its owner never stopped.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry import trace
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

# path -> () -> (content type, body)
Route = Callable[[], tuple[str, bytes]]


class SideServer:
    def __init__(
        self,
        host: str,
        port: int,
        routes: Mapping[str, Route],
        tracer: trace.Tracer | None = None,
    ) -> None:
        # Only a real tracer: a no-op one would cost a span object per scrape for nothing.
        traced = tracer if tracer is not None and not isinstance(tracer, trace.NoOpTracer) else None
        handler = _handler_for(dict(routes), traced)
        self._server = ThreadingHTTPServer((host, port), handler)
        # Request threads are joined on close too; Handler.timeout bounds how long
        # a client that never finishes its request can hold that up.
        self._server.daemon_threads = False
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="aimesh-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()
        atexit.register(self.stop)

    def stop(self) -> None:
        """Stop serving and wait for the thread; safe to call twice."""
        atexit.unregister(self.stop)
        if self._thread.is_alive():
            self._server.shutdown()  # returns once serve_forever has
            self._thread.join()
        self._server.server_close()

    @property
    def serving(self) -> bool:
        return self._thread.is_alive()


def _handler_for(
    routes: dict[str, Route], tracer: trace.Tracer | None
) -> type[BaseHTTPRequestHandler]:
    propagator = TraceContextTextMapPropagator()

    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # seconds a connection may sit idle mid-request

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if tracer is None or "traceparent" not in self.headers:
                self._serve(path)
                return
            # A caller's trace (the JWKS fetch of a token check) gets this hop's span.
            parent = propagator.extract({"traceparent": self.headers["traceparent"]})
            with tracer.start_as_current_span(
                f"GET {path}",
                context=parent,
                kind=SpanKind.SERVER,
                attributes={"http.request.method": "GET", "url.path": path},
            ):
                self._serve(path)

        def _serve(self, path: str) -> None:
            route = routes.get(path)
            if route is None:
                self.send_error(404)
                return
            try:
                content_type, body = route()
            except Exception:  # a failing route answers 503, never kills the thread
                self.send_error(503)
                return
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return  # scrapes every few seconds would drown the JSON logs

    return Handler
