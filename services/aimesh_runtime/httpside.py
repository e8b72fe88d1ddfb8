"""The HTTP side port: /metrics for Prometheus, /.well-known/jwks.json and others.

A small threaded stdlib server: these endpoints are read by scrapers and by
Envoy's JWKS fetch, never on a request's hot path, so a thread keeps them off
the event loop without another web framework.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# path -> () -> (content type, body)
Route = Callable[[], tuple[str, bytes]]


class SideServer:
    def __init__(self, host: str, port: int, routes: Mapping[str, Route]) -> None:
        handler = _handler_for(dict(routes))
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="aimesh-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler_for(routes: dict[str, Route]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            route = routes.get(self.path.split("?", 1)[0])
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
