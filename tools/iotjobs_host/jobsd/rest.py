"""A minimal restJson1 server: path-template routing, JSON bodies, AWS-shaped errors.

Both HTTP faces of jobsd (the `iot` control plane and the `iot-jobs-data` device API) are
restJson1 services as botocore speaks them: the operation is chosen by method and path, URI
labels are percent-encoded (`$next` arrives as `%24next`), and an error is signalled by the
`x-amzn-ErrorType` header plus a JSON body with `message`. Anything else a client sends (bad
JSON, unknown paths, an exception in a handler) still gets a well-formed error, so an SDK
always raises a ClientError instead of failing to parse the reply.

A handler returns the JSON body of a 200, or a `Reply` for another success status (DeleteCommand
answers 202 or 204; a 204 carries no body). A route can name the error shape its malformed
input is reported as: the AWS IoT commands operations model ValidationException, the older ones
InvalidRequestException.

HTTP/1.1 with Content-Length on every reply, because boto3 keeps connections alive. When a
FileStore is attached (`--files`, data listener only), GET/HEAD of `/files/...` are answered by
it instead of the router. When a Dashboard is attached (the control listener, dashboard.py),
GET/HEAD of `/dashboard` and below are answered by it, with its own access rules (a session
cookie from a presigned URL when `--credentials` is set).

With a `Verifier` (`--credentials`, auth.py) every other request must carry a valid AWS
Signature Version 4: the body is read (so the connection stays usable), then checked before the
router runs, so a refused request changes nothing. A refusal is a 403 restJson1 error, logged at
WARNING with the access key id it named (never a secret).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Optional
from collections.abc import Callable
from urllib.parse import parse_qs, unquote, urlsplit

from .auth import Verifier
from .files import PREFIX as FILES_PREFIX
from .files import FileStore
from .rules import ApiError as RestError
from .rules import parse_json, parse_long

if TYPE_CHECKING:
    from .dashboard import Dashboard

log = logging.getLogger("jobsd.http")

MAX_BODY = 1 << 20  # a CreateJob with a 32 KB document is far below this


@dataclass
class Request:
    method: str
    labels: dict[str, str]
    query: dict[str, str]
    body: dict[str, Any]
    invalid: str = "InvalidRequestException"  # the error shape for malformed input

    def q_str(self, name: str) -> Optional[str]:
        return self.query.get(name)

    def q_int(self, name: str) -> Optional[int]:
        value = self.query.get(name)
        if value is None:
            return None
        try:
            return parse_long(value)
        except ValueError:
            raise RestError(self.invalid, 400, f"{name} must be a 64-bit integer") from None

    def q_bool(self, name: str, default: bool) -> bool:
        value = self.query.get(name)
        if value is None:
            return default
        if value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise RestError(self.invalid, 400, f"{name} must be true or false")


@dataclass
class Reply:
    """A success other than 200: `status` (e.g. 202, or 204 with no body) and a JSON body."""
    status: int
    body: dict[str, Any]


# A handler returns the JSON body of the 200 reply (None for an empty object) or a Reply.
Handler = Callable[[Request], Any]


class Router:
    """Routes by method and a path template such as `/things/{thingName}/jobs/{jobId}`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._routes: list[tuple[str, list[str], Handler, str]] = []

    def add(self, method: str, template: str, handler: Handler,
            invalid: str = "InvalidRequestException") -> None:
        """`invalid`: the error shape for a malformed body or query of this operation."""
        self._routes.append((method, template.strip("/").split("/"), handler, invalid))

    def match(self, method: str, segments: list[str]
              ) -> Optional[tuple[Handler, dict[str, str], str]]:
        for route_method, pattern, handler, invalid in self._routes:
            if route_method != method or len(pattern) != len(segments):
                continue
            labels: dict[str, str] = {}
            for want, got in zip(pattern, segments, strict=True):
                if want.startswith("{"):
                    if not got:
                        break
                    labels[want[1:-1]] = got
                elif want != got:
                    break
            else:
                return handler, labels, invalid
        return None

    def handle(self, method: str, target: str,
               raw_body: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Return (status, body, extra headers); never raises."""
        try:
            parts = urlsplit(target)
            path = parts.path.strip("/")
            segments = [unquote(s) for s in path.split("/")] if path else []
            found = self.match(method, segments)
            if found is None:
                raise RestError("UnknownOperationException", 404,
                                f"{self.name} has no operation for {method} {parts.path}")
            handler, labels, invalid = found
            query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
            body: Any = {}
            if raw_body.strip():
                try:
                    body = parse_json(raw_body)
                except ValueError:
                    raise RestError(invalid, 400, "Request body is not valid UTF-8 JSON") from None
                if not isinstance(body, dict):
                    raise RestError(invalid, 400, "Request body must be a JSON object")
            result = handler(Request(method, labels, query, body, invalid))
            if isinstance(result, Reply):
                return result.status, result.body, {}
            return 200, result or {}, {}
        except RestError as err:
            return (err.status, {"message": err.message, **err.extra},
                    {"x-amzn-ErrorType": err.error_type})
        except Exception:
            log.exception("internal error on %s %s", method, target)
            return (500, {"message": "Internal error"},
                    {"x-amzn-ErrorType": "InternalFailureException"})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are two writes; without TCP_NODELAY the second waits for the client's
    # delayed ACK (about 40 ms a request on loopback).
    disable_nagle_algorithm = True
    server: RestServer

    def _serve(self) -> None:
        dashboard = self.server.dashboard
        if dashboard is not None and dashboard.claims(self.path):
            if self._discard_body():  # read-only pages with their own access rules
                dashboard.serve(self)
            return
        files = self.server.files
        if files is not None and self.path.startswith(FILES_PREFIX) and self.command in (
                "GET", "HEAD"):
            if self._discard_body():
                files.serve(self, head=self.command == "HEAD")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True  # the body cannot be skipped reliably
            status, body, headers = 400, {"message": "Content-Length missing or too large"}, {
                "x-amzn-ErrorType": "InvalidRequestException"}
        else:
            raw = self.rfile.read(length) if length else b""
            refusal = self._refusal(raw)
            if refusal is not None:
                status, body, headers = refusal
            else:
                status, body, headers = self.server.router.handle(self.command, self.path, raw)
        data = b"" if status == 204 else json.dumps(body).encode()  # 204: no body at all
        self.send_response(status)
        if status != 204:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and data:
            self.wfile.write(data)

    def _refusal(self, raw: bytes) -> Optional[tuple[int, dict[str, Any], dict[str, str]]]:
        """The 403 reply for a request whose SigV4 signature does not hold; None when it does
        (or when the server checks none)."""
        auth = self.server.auth
        if auth is None:
            return None
        refused = auth.verify(self.command, self.path, self.headers, raw)
        if refused is None:
            return None
        def clean(text: str) -> str:  # the client's words: one line, no control characters
            return text[:200].encode("unicode_escape").decode("ascii")

        log.warning("%s: refused %s %s from %s (access key %s): %s: %s", self.server.router.name,
                    self.command, clean(urlsplit(self.path).path), self.client_address[0],
                    clean(refused.key_id or "-"), refused.error_type,
                    clean(refused.message.split("\n")[0]))
        return (refused.status, {"message": refused.message},
                {"x-amzn-ErrorType": refused.error_type})

    def _discard_body(self) -> bool:
        """Read and drop a request body we have no use for; False (connection closed) when it
        cannot be skipped."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
            self.send_error(400, "Content-Length missing or too large")
            return False
        if length:
            self.rfile.read(length)
        return True

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = _serve

    # http.server answers some requests before any do_* method runs (malformed request line,
    # URI or headers too long, a method with no do_*): answer those as restJson1 errors too.
    _EARLY = {501: (404, "UnknownOperationException")}

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        status, kind = self._EARLY.get(code, (400, "InvalidRequestException"))
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.1"  # else http.server writes no status line or headers
        text = message or explain or "Bad request"
        if code == 501:
            text = f"No operation for method {self.command!r}"
        data = json.dumps({"message": text}).encode()
        self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        self.send_header("x-amzn-ErrorType", kind)
        self.send_header("Connection", "close")
        self.end_headers()
        if getattr(self, "command", None) != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        log.debug("%s %s", self.server.router.name, format % args)


class RestServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], router: Router,
                 auth: Optional[Verifier] = None) -> None:
        self.router = router
        self.auth = auth  # --credentials: SigV4 on every request but /files/ (auth.py) and
        # /dashboard (a presigned link, then a session cookie: dashboard.py)
        self.files: Optional[FileStore] = None  # the data listener's /files/ (files.py)
        self.dashboard: Optional[Dashboard] = None  # the control listener's /dashboard
        super().__init__(address, _Handler)
        self._thread: Optional[threading.Thread] = None

    @property
    def address(self) -> str:
        host, port = self.server_address[:2]
        return f"{host}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, args=(0.1,),
                                        name=self.router.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() would wait forever for a loop never started
            self.shutdown()
            self._thread.join()
        self.server_close()
