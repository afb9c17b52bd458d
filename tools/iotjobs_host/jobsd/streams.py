"""AWS IoT MQTT-based file delivery ("streams"): names, limits, request validation, the block
selection rule and the wire shapes. Pure functions, no I/O and no state; `Service` holds the
behaviour (service.py), as commands.py does for AWS IoT commands.

Sources: STREAMS.md (in `../shared/`) sections 1-4 and 11; botocore's `iot` model (CreateStream,
DescribeStream, UpdateStream, ListStreams, DeleteStream). Where STREAMS.md marks a rule [infer],
this module makes a choice and says so here (README "Streams (MQTT file delivery) in jobsd"):

* a new stream is version 1; each UpdateStream adds exactly one, and an update past 65535 is a
  LimitExceededException (the version never wraps);
* more than 50 files in CreateStream / UpdateStream, a fileId outside 0..255, a duplicate
  fileId, a missing s3Location is an InvalidRequestException (the model's bound on the list,
  enforced as input validation; STREAMS.md 11.17);
* past the end of file: `o` >= the block count, or a bitmap bit set past the last block, is
  InvalidRequest "The data requested is out of the range of data available." (always). With no
  `n`, the implied range `o .. o + 131072/l - 1` must fit in the file (strict, the default, as
  aws-iot-mqtt-download-agent#4 observed); `--stream-eof clamp` serves what is left instead. An
  explicit `n` running past the end is clamped (FreeRTOS devices send a fixed `n`);
* `n` = 0 and an all-zero bitmap are valid and send nothing (no reply at all);
* the JSON bitmap is a hex string with or without `0x`, either case; an odd number of digits or
  another character is InvalidRequest. In CBOR, `b` must be a byte string: any other type is
  InvalidCbor (aws-iot-mqtt-download-agent#3 for a text string);
* `d` is always in the description, "" for a stream without one;
* topics: a request on `<verb>/<fmt>` with a verb other than `describe` / `get`, or a format
  other than `json` / `cbor`, is InvalidTopic on `.../rejected/json` (`rejected/cbor` when the
  format is cbor); `description`, `data` and `rejected` are replies and never answered;
* delivery: `data` at QoS 0 (at most once, as STREAMS.md 2 advises clients to assume),
  `description` and `rejected` at QoS 1.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Optional

from .rules import ApiError, is_int, parse_json

MAX_STREAM_ID = 128
MAX_DESCRIPTION = 2028
MAX_FILES = 50
MAX_FILE_ID = 255
MIN_ROLE_ARN, MAX_ROLE_ARN = 20, 2048
MAX_VERSION = 65535
MAX_TAG_KEY, MAX_TAG_VALUE = 128, 256
MAX_RESULTS = 250               # ListStreams maxResults

MIN_BLOCK, MAX_BLOCK = 256, 131072
MAX_REQUEST_BYTES = 131072      # one GetStream sends at most 128 KiB (STREAMS.md 4)
MAX_OFFSET = MAX_COUNT = 98304  # o and n: a 24 MiB file in 256-byte blocks
MAX_BITMAP = 12288              # b must be shorter than this many bytes
MAX_TOKEN = 64                  # c, in UTF-8 bytes

JSON, CBOR = "json", "cbor"
FORMATS = (JSON, CBOR)
DESCRIBE, GET = "describe", "get"
REPLIES = ("description", "data", "rejected")
QOS_DATA, QOS_REPLY = 0, 1
OUT_OF_RANGE = "The data requested is out of the range of data available."

_ID_RE = re.compile(r"[a-zA-Z0-9_-]{1,%d}" % MAX_STREAM_ID)
_THING_RE = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
_HEX_RE = re.compile(r"(?:0[xX])?((?:[0-9a-fA-F]{2})*)")
_TAG_KEY_RE = re.compile(r"[\w\s.:/=+\-@]*")


def invalid(message: str) -> ApiError:
    return ApiError("InvalidRequestException", 400, message)


def valid_id(value: Any) -> bool:
    """Stream ids and OTA update ids: [a-zA-Z0-9_-]{1,128}."""
    return isinstance(value, str) and bool(_ID_RE.fullmatch(value))


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch).startswith("C") for ch in text)


def text(body: dict[str, Any], name: str, limit: int = MAX_DESCRIPTION) -> Optional[str]:
    """An optional `[^\\p{C}]+` string of at most `limit` characters."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= limit or _has_control(value):
        raise invalid(f"{name} must be 1..{limit} characters without control characters")
    return value


def role_arn(value: Any, what: str = "roleArn") -> str:
    if not isinstance(value, str) or not MIN_ROLE_ARN <= len(value) <= MAX_ROLE_ARN:
        raise invalid(f"{what} must be a string of {MIN_ROLE_ARN}..{MAX_ROLE_ARN} characters")
    return value


def tags(value: Any) -> list[dict[str, str]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid("tags must be a list of Key/Value objects")
    out = []
    for tag in value:
        if not isinstance(tag, dict):
            raise invalid("tags must be a list of Key/Value objects")
        key, val = tag.get("Key"), tag.get("Value", "")
        if (not isinstance(key, str) or not 1 <= len(key) <= MAX_TAG_KEY
                or not _TAG_KEY_RE.fullmatch(key)):
            raise invalid(f"tag Key must be 1..{MAX_TAG_KEY} letters, digits, spaces or _.:/=+-@")
        if not isinstance(val, str) or len(val) > MAX_TAG_VALUE:
            raise invalid(f"tag Value must be at most {MAX_TAG_VALUE} characters")
        out.append({"Key": key, "Value": val})
    return out


# -- control plane ---------------------------------------------------------------------------

@dataclass
class StreamFile:
    """One file of a stream: where it comes from (S3 terms) and what it held when the stream
    was created or last updated (the ETag the device side checks against)."""
    file_id: int
    bucket: str
    key: str
    version: Optional[str] = None
    size: int = 0
    sha256: str = ""

    def s3_location(self) -> dict[str, str]:
        out = {"bucket": self.bucket, "key": self.key}
        if self.version is not None:
            out["version"] = self.version
        return out

    def to_json(self) -> dict[str, Any]:
        return {"fileId": self.file_id, "bucket": self.bucket, "key": self.key,
                "version": self.version, "size": self.size, "sha256": self.sha256}

    @staticmethod
    def from_json(d: dict[str, Any]) -> StreamFile:
        return StreamFile(d["fileId"], d["bucket"], d["key"], d.get("version"), d["size"],
                          d["sha256"])


def s3_location(value: Any, what: str) -> tuple[str, str, Optional[str]]:
    """(bucket, key, version) of an S3Location."""
    if not isinstance(value, dict):
        raise invalid(f"{what}.s3Location is required (bucket, key)")
    bucket, key, version = value.get("bucket"), value.get("key"), value.get("version")
    if not isinstance(bucket, str) or not bucket or "/" in bucket:
        raise invalid(f"{what}.s3Location.bucket must be a non-empty bucket name")
    if not isinstance(key, str) or not key:
        raise invalid(f"{what}.s3Location.key must be a non-empty string")
    if version is not None and not isinstance(version, str):
        raise invalid(f"{what}.s3Location.version must be a string")
    return bucket, key, version


def parse_files(value: Any) -> list[StreamFile]:
    """CreateStream / UpdateStream `files`: 1..50 entries with distinct fileIds (sizes and
    hashes are filled in by the service from the files folder)."""
    if not isinstance(value, list) or not value:
        raise invalid("files must be a list of 1..50 {fileId, s3Location} entries")
    if len(value) > MAX_FILES:
        raise invalid(f"A stream holds at most {MAX_FILES} files; {len(value)} were given.")
    out: list[StreamFile] = []
    seen: set[int] = set()
    for i, item in enumerate(value):
        what = f"files[{i}]"
        if not isinstance(item, dict):
            raise invalid(f"{what} must be an object with fileId and s3Location")
        file_id = item.get("fileId")
        if not is_int(file_id) or not 0 <= file_id <= MAX_FILE_ID:
            raise invalid(f"{what}.fileId must be an integer in 0..{MAX_FILE_ID}")
        if file_id in seen:
            raise invalid(f"fileId {file_id} is listed twice")
        seen.add(file_id)
        bucket, key, version = s3_location(item.get("s3Location"), what)
        out.append(StreamFile(file_id, bucket, key, version))
    return out


@dataclass
class StreamSpec:
    """CreateStream (everything) or UpdateStream (None = keep)."""
    description: Optional[str]
    files: Optional[list[StreamFile]]
    role_arn: Optional[str]
    tags: list[dict[str, str]] = field(default_factory=list)


def parse_create(stream_id: str, body: dict[str, Any]) -> StreamSpec:
    if not valid_id(stream_id):
        raise invalid(f"streamId must match [a-zA-Z0-9_-]{{1,{MAX_STREAM_ID}}}")
    if body.get("files") is None:
        raise invalid("files is required")
    if body.get("roleArn") is None:
        raise invalid("roleArn is required")
    return StreamSpec(text(body, "description"), parse_files(body["files"]),
                      role_arn(body["roleArn"]), tags(body.get("tags")))


def parse_update(stream_id: str, body: dict[str, Any]) -> StreamSpec:
    if not valid_id(stream_id):
        raise invalid(f"streamId must match [a-zA-Z0-9_-]{{1,{MAX_STREAM_ID}}}")
    files = body.get("files")
    role = body.get("roleArn")
    return StreamSpec(text(body, "description"), None if files is None else parse_files(files),
                      None if role is None else role_arn(role))


# -- device side: topics -----------------------------------------------------------------------

SUBSCRIPTION = "$aws/things/+/streams/#"


def is_stream_topic(topic: str) -> bool:
    """`$aws/things/<T>/streams/...` (a job id may be "streams": `.../jobs/streams/get` is not)."""
    return topic.startswith("$aws/things/") and topic.split("/", 4)[3:4] == ["streams"]


@dataclass(frozen=True)
class Route:
    thing: str
    stream_id: str
    verb: str           # describe | get | anything else (InvalidTopic)
    fmt: str            # json | cbor | anything else (InvalidTopic)

    @property
    def valid(self) -> bool:
        return (self.verb in (DESCRIBE, GET) and self.fmt in FORMATS
                and bool(_THING_RE.fullmatch(self.thing)) and valid_id(self.stream_id))

    @property
    def reply_fmt(self) -> str:
        """Replies are in the request's format; an unknown one is answered in JSON."""
        return self.fmt if self.fmt in FORMATS else JSON

    def topic(self, suffix: str) -> str:
        return f"$aws/things/{self.thing}/streams/{self.stream_id}/{suffix}/{self.reply_fmt}"


def route(topic: str) -> Optional[Route]:
    """The request a `$aws/things/<T>/streams/<S>/<verb>/<fmt>` topic names; None for anything
    that is not a request (other topics, and the replies: ours or a device's forgeries).
    Never raises."""
    parts = topic.split("/")
    if len(parts) < 5 or parts[0] != "$aws" or parts[1] != "things" or parts[3] != "streams":
        return None
    if not parts[2] or not parts[4] or (len(parts) > 5 and parts[5] in REPLIES):
        return None
    # a malformed request (no verb or format, or extra levels) is answered InvalidTopic
    return Route(parts[2], parts[4], parts[5] if len(parts) > 5 else "",
                 parts[6] if len(parts) == 7 else "")


# -- device side: requests ---------------------------------------------------------------------

class StreamError(Exception):
    """A rejected describe or get: `code` from STREAMS.md 3.5; `token` is echoed when it was
    parsed and valid."""

    def __init__(self, code: str, message: str, token: Optional[str] = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.token = token


def decode(payload: bytes, fmt: str) -> dict[Any, Any]:
    """The request map; InvalidJson / InvalidCbor when it does not parse or is not a map. An
    empty payload is an empty request (every describe member is optional)."""
    if fmt == JSON and not payload.strip() or not payload:
        return {}
    if fmt == JSON:
        try:
            body = parse_json(payload)
        except (ValueError, RecursionError):
            raise StreamError("InvalidJson", "Invalid JSON message") from None
        if not isinstance(body, dict):
            raise StreamError("InvalidJson", "The request must be a JSON object")
        return body
    import cbor2

    fp = io.BytesIO(payload)
    try:
        body = cbor2.CBORDecoder(fp).decode()
    except Exception:  # CBORDecodeError, and anything a hostile tag makes the decoder raise
        raise StreamError("InvalidCbor", "Invalid CBOR message") from None
    if fp.tell() != len(payload) or not isinstance(body, dict):
        raise StreamError("InvalidCbor", "Invalid CBOR message")
    return body


def client_token(body: dict[Any, Any]) -> Optional[str]:
    """`c`, or None when absent; InvalidRequest (without `c`) when it is not a string of at
    most 64 UTF-8 bytes."""
    token = body.get("c")
    if token is None:
        return None
    if not isinstance(token, str):
        raise StreamError("InvalidRequest", "c must be a string")
    try:
        size = len(token.encode())
    except UnicodeEncodeError:
        raise StreamError("InvalidRequest", "c must be valid UTF-8") from None
    if size > MAX_TOKEN:
        raise StreamError("InvalidRequest", f"c must be at most {MAX_TOKEN} bytes")
    return token


def _int(body: dict[Any, Any], name: str, token: Optional[str], required: bool = False
         ) -> Optional[int]:
    value = body.get(name)
    if value is None:
        if required:
            raise StreamError("InvalidRequest", f"{name} is required", token)
        return None
    if not is_int(value):
        raise StreamError("InvalidRequest", f"{name} must be an integer", token)
    return value


@dataclass
class GetRequest:
    token: Optional[str]
    version: Optional[int]
    file_id: int
    block_size: int
    offset: int
    count: Optional[int]             # None: not sent
    bitmap: Optional[bytes]          # None: not sent


def _bitmap(value: Any, fmt: str, token: Optional[str]) -> bytes:
    if fmt == CBOR:
        if not isinstance(value, bytes):
            raise StreamError("InvalidCbor", "Invalid CBOR message: b must be a byte string")
        return value
    if not isinstance(value, str):
        raise StreamError("InvalidRequest", 'b must be a hex string such as "0x130080"', token)
    m = _HEX_RE.fullmatch(value)
    if m is None:
        raise StreamError("InvalidRequest", 'b must be a hex string such as "0x130080"', token)
    return binascii.unhexlify(m.group(1))


def parse_get(body: dict[Any, Any], fmt: str) -> GetRequest:
    token = client_token(body)
    version = _int(body, "s", token)
    file_id = _int(body, "f", token, required=True)
    block = _int(body, "l", token, required=True)
    offset = _int(body, "o", token)
    count = _int(body, "n", token)
    bitmap = None if body.get("b") is None else _bitmap(body["b"], fmt, token)
    assert file_id is not None and block is not None
    if not MIN_BLOCK <= block <= MAX_BLOCK:
        raise StreamError("BlockSizeOutOfBounds",
                          f"l must be in {MIN_BLOCK}..{MAX_BLOCK}", token)
    if offset is not None and not 0 <= offset <= MAX_OFFSET:
        raise StreamError("OffsetOutOfBounds", f"o must be in 0..{MAX_OFFSET}", token)
    if count is not None and not 0 <= count <= MAX_COUNT:
        raise StreamError("BlockCountLimitExceeded", f"n must be in 0..{MAX_COUNT}", token)
    if bitmap is not None and len(bitmap) >= MAX_BITMAP:
        raise StreamError("BlockBitmapLimitExceeded",
                          f"b must be shorter than {MAX_BITMAP} bytes", token)
    return GetRequest(token, version, file_id, block, offset or 0, count, bitmap)


def select_blocks(req: GetRequest, size: int, strict_eof: bool = True) -> list[int]:
    """The absolute block indexes one GetStream sends, in order (STREAMS.md 4); StreamError
    InvalidRequest when the request reaches past the end of the file (rules in the module
    docstring)."""
    block = req.block_size
    nblocks = -(-size // block)
    per_request = MAX_REQUEST_BYTES // block
    wanted = per_request if req.count is None else min(req.count, per_request)
    o = req.offset
    if o >= nblocks:
        raise StreamError("InvalidRequest", OUT_OF_RANGE, req.token)
    if req.bitmap is not None:
        used = req.bitmap.rstrip(b"\0")
        last = (len(used) - 1) * 8 + used[-1].bit_length() - 1 if used else -1
        if last >= 0 and o + last >= nblocks:
            raise StreamError("InvalidRequest", OUT_OF_RANGE, req.token)
    if req.count is None and strict_eof and o + per_request > nblocks:
        raise StreamError("InvalidRequest", OUT_OF_RANGE, req.token)
    if req.bitmap is None:
        return list(range(o, min(o + wanted, nblocks)))
    out: list[int] = []
    for j, byte in enumerate(req.bitmap):
        if not byte:
            continue
        for bit in range(8):
            if byte & (1 << bit):
                if len(out) >= wanted:
                    return out
                out.append(o + j * 8 + bit)
    return out[:wanted]


def parse_describe(body: dict[Any, Any]) -> Optional[str]:
    """DescribeStream: only `c`."""
    return client_token(body)


# -- device side: replies ----------------------------------------------------------------------

def _cbor_uint(value: int) -> bytes:
    """The head of a CBOR unsigned integer (major type 0)."""
    return _cbor_head(0, value)


def _cbor_head(major: int, value: int) -> bytes:
    m = major << 5
    if value < 24:
        return bytes((m | value,))
    if value < 0x100:
        return bytes((m | 24, value))
    if value < 0x10000:
        return bytes((m | 25,)) + value.to_bytes(2, "big")
    if value < 0x100000000:
        return bytes((m | 26,)) + value.to_bytes(4, "big")
    return bytes((m | 27,)) + value.to_bytes(8, "big")


def _cbor_indefinite(items: list[tuple[str, Any]]) -> bytes:
    """An indefinite-length map `BF ... FF` as the real service frames every reply."""
    import cbor2

    return b"\xbf" + b"".join(cbor2.dumps(k) + cbor2.dumps(v) for k, v in items) + b"\xff"


def description(fmt: str, token: Optional[str], version: int, desc: Optional[str],
                files: list[tuple[int, int]]) -> bytes:
    items: list[tuple[str, Any]] = [] if token is None else [("c", token)]
    items += [("s", version), ("d", desc or ""), ("r", [{"f": f, "z": z} for f, z in files])]
    if fmt == CBOR:
        return _cbor_indefinite(items)
    return json.dumps(dict(items), separators=(",", ":")).encode()


def rejection(fmt: str, code: str, message: str, token: Optional[str]) -> bytes:
    """Both key sets at once, as the real service sends them (STREAMS.md 3.4); no token keys
    when the token was missing or invalid."""
    items: list[tuple[str, Any]] = [] if token is None else [("clientToken", token), ("c", token)]
    items += [("code", code), ("o", code), ("message", message), ("m", message)]
    if fmt == CBOR:
        return _cbor_indefinite(items)
    return json.dumps(dict(items), separators=(",", ":")).encode()


class DataEncoder:
    """Builds one request's data messages without a general-purpose encoder per block: the
    parts that do not change between blocks are made once."""

    def __init__(self, fmt: str, token: Optional[str], file_id: int) -> None:
        self.fmt = fmt
        if fmt == CBOR:
            import cbor2

            self._head = b"\xbf" + (b"" if token is None else b"\x61c" + cbor2.dumps(token)) + (
                b"\x61f" + _cbor_uint(file_id) + b"\x61i")
        else:
            c = b"" if token is None else b'"c":' + json.dumps(token).encode() + b","
            self._head = b"{" + c + b'"f":%d,"l":' % file_id

    def message(self, index: int, payload: memoryview) -> bytes:
        size = len(payload)
        if self.fmt == CBOR:
            return b"".join((self._head, _cbor_uint(index), b"\x61l", _cbor_uint(size),
                             b"\x61p", _cbor_head(2, size), payload, b"\xff"))
        return b"".join((self._head, b'%d,"i":%d,"p":"' % (size, index),
                         base64.b64encode(payload), b'"}'))
