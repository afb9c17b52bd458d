"""A loopback HTTP server for download tests that misbehaves on purpose: it serves one body at
every path, honours Range requests, cuts the first `cuts` responses short after `keep` bytes
(Content-Length promises more), and answers `fail_status` to the first `fails` requests
(`fails=-1`: to all of them). `ranges` records the start offset of every request. With
`tls=(cert.pem, key.pem)` it speaks HTTPS (url: https://localhost:PORT/)."""
from __future__ import annotations

import http.server
import ssl
import threading


class FlakyServer:
    def __init__(self, image: bytes, cuts: int = 0, keep: int = 0,
                 fail_status: int | None = None, fails: int = 0,
                 tls: tuple[str, str] | None = None) -> None:
        outer = self
        self.image, self.cuts, self.keep, self.ranges = image, cuts, keep, []
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
                body = outer.image[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(outer.image) - 1}/{len(outer.image)}")
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

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
