# A minimal streaming HTTP/1.1 GET for downloads: TLS that verifies the server with the
# configured CA (MicroPython's built-in `requests` never verifies), Range requests to resume,
# an allowlist of URL prefixes, and a body read into the caller's one reused buffer.
# Failures are OSError (link) or HttpError (status, refusal) so handlers can tell them apart.
import socket
from micropython import const

_MAX_HEADER = const(1024)

# For type checkers only (tools/stubcheck, an editor): the compiler folds the constant and drops
# the block, so this import costs the device nothing.
TYPE_CHECKING = const(False)
if TYPE_CHECKING:
    from tls import SSLContext


class HttpError(Exception):
    def __init__(self, reason, status=0):
        super().__init__(reason)
        self.reason = reason
        self.status = status


def split_url(url):
    """(scheme, host, port, path) of an http(s) URL; HttpError(BAD_URL) otherwise."""
    if url.startswith("https://"):
        scheme, rest, port = "https", url[8:], 443
    elif url.startswith("http://"):
        scheme, rest, port = "http", url[7:], 80
    else:
        raise HttpError("BAD_URL")
    slash = rest.find("/")
    hostport, path = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
    if "@" in hostport or not hostport:
        raise HttpError("BAD_URL")
    colon = hostport.rfind(":")
    host = hostport
    if colon > 0:
        host = hostport[:colon]
        try:
            port = int(hostport[colon + 1 :])
        except ValueError:
            raise HttpError("BAD_URL")
    for c in path:
        if c <= " " or c == "\x7f":
            raise HttpError("BAD_URL")
    return scheme, host, port, path


def allowed(url, allowlist):
    """True when the URL starts with one of the configured prefixes (scheme://host[:port]/...)."""
    for prefix in allowlist or ():
        if url.startswith(prefix):
            return True
    return False


class Response:
    """An open response: `status`, `length` (bytes still to come, or -1), `start` (offset of
    the first body byte: the Range start on 206, else 0), `total` (full size if known)."""

    def __init__(self, sock, status, length, start, total):
        self.sock = sock
        self.status = status
        self.length = length
        self.start = start
        self.total = total

    def readinto(self, mv):
        """Read up to len(mv) body bytes; 0 at the end of the body."""
        n = len(mv)
        if self.length >= 0:
            if self.length == 0:
                return 0
            n = min(n, self.length)
        got = self.sock.readinto(mv[:n]) if n < len(mv) else self.sock.readinto(mv)
        if got is None:
            got = 0
        if self.length >= 0:
            if got == 0:
                raise OSError("body truncated")
            self.length -= got
        return got

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def get(url, ssl_context: "SSLContext | None" = None, start=0, timeout=10):
    """Open a GET (from byte `start` with a Range header); returns a Response whose status is
    200 or 206. HttpError for other statuses, OSError when the link fails. `ssl_context`: for
    https, or a function that makes it (called on first use)."""
    scheme, host, port, path = split_url(url)
    addr = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0][-1]
    s = socket.socket()
    try:
        s.settimeout(timeout)
        s.connect(addr)
        if scheme == "https":
            if callable(ssl_context):  # made on first use: a TLS context costs heap
                ssl_context = ssl_context()
            if ssl_context is None:
                raise HttpError("NO_CA")
            try:
                s = ssl_context.wrap_socket(s, server_hostname=host)
            except ValueError as e:
                # MicroPython reports a certificate that does not verify (wrong CA, wrong host
                # name, expired) as ValueError with mbedTLS's text: not the link, never retried
                raise HttpError("TLS_CERT_REJECTED: " + str(e).strip()[:80])
        req = "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\nUser-Agent: iotjobs\r\n" % (path, host)
        if start:
            req += "Range: bytes=%d-\r\n" % start
        s.write(req.encode() + b"\r\n")
        line = s.readline()
        if not line:  # closed before a word (a server killed mid-request): a lost link
            raise OSError("connection closed before the response")
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise HttpError("BAD_RESPONSE")
        status = int(parts[1])
        length, first, total = -1, 0, -1
        size = 0
        while True:
            line = s.readline()
            size += len(line)
            if size > _MAX_HEADER * 8:
                raise HttpError("BAD_RESPONSE")
            if not line or line == b"\r\n":
                break
            colon = line.find(b":")
            if colon < 0:
                continue
            name = line[:colon].strip().lower()
            value = line[colon + 1 :].strip()
            if name == b"content-length":
                length = int(value)
            elif name == b"content-range" and value.startswith(b"bytes "):
                # bytes a-b/total, or bytes */total (a 416's: no range of it is satisfiable)
                rng, _, tot = value[6:].partition(b"/")
                if rng != b"*":
                    first = int(rng.split(b"-")[0])
                if tot != b"*":
                    total = int(tot)
        if status == 200:
            first = 0
            total = length
        elif status == 206:
            if first != start:
                raise HttpError("BAD_RANGE", status)
        elif status == 416 and start and total == start:
            # asked from the very end (a resume after the last byte was kept): nothing is left,
            # an empty 206; the 416's own body is not the file's and is never read
            return Response(s, 206, 0, start, total)
        else:
            raise HttpError("HTTP_%d" % status, status)
        return Response(s, status, length, first, total)
    except ValueError:
        s.close()
        raise HttpError("BAD_RESPONSE")
    except BaseException:  # HttpError, OSError, MemoryError...: never leak the socket
        s.close()
        raise
