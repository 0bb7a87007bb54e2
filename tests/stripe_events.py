"""Stripe's signed events, for the tests that stand where Stripe's delivery would: a catcher
that takes what localstripe sends (so a test can hand it on itself), and the Stripe-Signature
header computed as Stripe (and localstripe) computes it."""
import hashlib
import hmac
import http.server
import threading
import time


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """A Stripe-Signature header for `payload` (now, unless `timestamp` says when)."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.took(body, self.headers["Stripe-Signature"])
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


class Catcher(http.server.ThreadingHTTPServer):
    """Takes event deliveries on 127.0.0.1 (a port of its own) until close(); `url` is where to
    point localstripe's webhook."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self._lock = threading.Lock()
        self._events: list[tuple[bytes, str]] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/events"

    def took(self, body: bytes, signature: str) -> None:
        with self._lock:
            self._events.append((body, signature))

    def events(self) -> list[tuple[bytes, str]]:
        """What was delivered so far, (body, Stripe-Signature) in order."""
        with self._lock:
            return list(self._events)

    def close(self) -> None:
        self.shutdown()
        self.server_close()
