"""A loopback HTTP(S) server for the download tests and the bench. It serves one body at every
path, honours Range requests, and can misbehave on purpose: it cuts the first `cuts` responses
short after `keep` bytes (Content-Length promises more) and answers `fail_status` to the first
`fails` requests (`fails=-1`: to all of them). `ranges` records the start offset of every
request. With `tls=(cert.pem, key.pem)` it speaks HTTPS (url: https://localhost:PORT/). With
`root=DIR` (and `image=None`) it serves the files under DIR instead (404 for anything else)."""
from __future__ import annotations

import http.server
import os
import ssl
import threading
import urllib.parse


class FlakyServer:
    def __init__(self, image: bytes | None, cuts: int = 0, keep: int = 0,
                 fail_status: int | None = None, fails: int = 0,
                 tls: tuple[str, str] | None = None, root: str | None = None) -> None:
        outer = self
        self.image, self.cuts, self.keep, self.ranges = image, cuts, keep, []
        self.root = root
        self.fail_status, self.fails = fail_status, fails

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                outer.ranges.append(start)
                if outer.fail_status and outer.fails:
                    outer.fails -= 1 if outer.fails > 0 else 0
                    self.send_response(outer.fail_status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                whole = outer.image if root is None else outer.read(self.path)
                if whole is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if rng and start >= len(whole):  # nothing from there: 416, as S3 and jobsd
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(whole)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = whole[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(whole) - 1}/{len(whole)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cuts > 0:
                    outer.cuts -= 1
                    self.wfile.write(body[:outer.keep])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        ctx = None
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def finish_request(self, request, client_address):
                # The TLS handshake in the connection's own thread, with a deadline: a client
                # that never finishes it cannot hold up the server or its shutdown.
                request.settimeout(10)
                if ctx is not None:
                    try:
                        request = ctx.wrap_socket(request, server_side=True)
                    except (OSError, ssl.SSLError):
                        outer.refused += 1
                        return
                super().finish_request(request, client_address)

        self.refused = 0  # TLS handshakes the client broke off
        self.httpd = Server(("127.0.0.1", 0), H)
        self.port = self.httpd.server_address[1]
        self.url = (f"https://localhost:{self.port}/" if tls else f"http://127.0.0.1:{self.port}/")
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def read(self, url_path: str) -> bytes | None:
        """The file under `root` at a request path, or None (missing, or outside root)."""
        rel = urllib.parse.unquote(url_path.split("?", 1)[0]).lstrip("/")
        path = os.path.realpath(os.path.join(self.root, rel))
        if not path.startswith(os.path.realpath(self.root) + os.sep) or not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            return f.read()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
