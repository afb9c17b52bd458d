"""`--credentials FILE`: AWS Signature Version 4 verification on jobsd's REST listeners.

FILE is an AWS shared-credentials file (`~/.aws/credentials` format): every section holds one
accepted key pair, `aws_access_key_id` and `aws_secret_access_key` (and, optionally,
`aws_session_token`, which requests signed with that pair must then carry). A request on the
control listener (signing name `iot`) or an iot-jobs-data request on the data listener (signing
name `iot-jobs-data`; both names come from botocore's service models) must carry a valid SigV4
signature, in an `Authorization` header or as a presigned query string (`X-Amz-Algorithm`,
`X-Amz-Credential`, `X-Amz-Date`, `X-Amz-SignedHeaders`, `X-Amz-Signature`, optional
`X-Amz-Expires`). The `/files/` URLs on the data listener carry their own signatures
(files.py) and are not checked here.

The expected signature is computed by botocore's own signer (`SigV4Auth` / `SigV4QueryAuth`)
over an `AWSRequest` rebuilt from what arrived: method, path, query (minus `X-Amz-Signature`),
exactly the headers named in SignedHeaders, the timestamp of `X-Amz-Date` and the body. The
only thing changed in the signer is the choice of headers: botocore, when signing, leaves out
some headers (User-Agent, ...); a verifier must take the list the client signed.

Refusals are the errors AWS's front end gives, checked in the order it checks them (as recorded
by dynalite, a DynamoDB emulator whose messages were captured from AWS): all 403, because iot
and iot-jobs-data are restJson1 services (the JSON-1.0 services answer 400 instead).

| case | x-amzn-ErrorType | message |
|---|---|---|
| header and query signature both | InvalidSignatureException | Found both 'X-Amz-Algorithm' ... |
| no signature / not `AWS4-...` | MissingAuthenticationTokenException | Missing Authentication Token |
| parameters missing / malformed | IncompleteSignatureException | Authorization header requires ... |
| date not `YYYYMMDDTHHMMSSZ` | IncompleteSignatureException | Date must be in ISO-8601 ... |
| older than 15 min | InvalidSignatureException | Signature expired: ... (... - 15 min.) |
| newer than 15 min ahead | InvalidSignatureException | Signature not yet current: ... |
| `host` not signed | InvalidSignatureException | 'Host' or ':authority' must be ... |
| other algorithm | IncompleteSignatureException | Unsupported AWS 'algorithm': ... |
| credential not 5 parts | IncompleteSignatureException | Credential must have exactly 5 ... |
| scope region/service/term/date | InvalidSignatureException | Credential should be scoped ... |
| unknown access key id | UnrecognizedClientException | The security token included ... |
| signature (or body) differs | InvalidSignatureException | The request signature we calculated ... |
| session token wrong | UnrecognizedClientException | The security token included ... |

A presigned request expires X-Amz-Expires seconds (1..604800) after its X-Amz-Date, or 15
minutes after it when the parameter is absent.
"""

from __future__ import annotations

import configparser
import datetime
import functools
import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.message import Message
from email.utils import parsedate_to_datetime
from typing import Any, Optional
from urllib.parse import unquote, urlsplit

# botocore is imported when a Verifier is made (about 0.3 s): a jobsd without --credentials
# starts without it.

SIGV4_TIMESTAMP = "%Y%m%dT%H%M%SZ"  # botocore.auth.SIGV4_TIMESTAMP
ALGORITHM = "AWS4-HMAC-SHA256"
MAX_SKEW = datetime.timedelta(minutes=15)
MAX_EXPIRES = 604800  # a week: the longest a SigV4 presigned URL may live
QUERY_PARAMS = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Signature",
                "X-Amz-SignedHeaders", "X-Amz-Date")

MISSING_TOKEN = "Missing Authentication Token"
BAD_TOKEN = "The security token included in the request is invalid."
MISMATCH = ("The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key and signing method. Consult the service "
            "documentation for details.")
_DATE_RE = re.compile(r"\d{8}T\d{6}Z")


class CredentialsError(Exception):
    """The --credentials file cannot be used; the text says why."""


@dataclass(frozen=True)
class KeyPair:
    access_key: str
    secret_key: str = ""
    token: Optional[str] = None
    profile: str = ""

    def __repr__(self) -> str:  # never the secret, not even in a traceback
        return f"KeyPair({self.access_key!r}, profile={self.profile!r})"


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused: the restJson1 error (always 403) and the key id it named."""
    error_type: str
    message: str
    key_id: Optional[str] = None
    status: int = 403


def load_credentials(path: str) -> dict[str, KeyPair]:
    """Access key id -> KeyPair for every section of the shared-credentials file at `path`."""
    # no DEFAULT section merged into the others, no `%` interpolation (secrets may hold `%`)
    parser = configparser.ConfigParser(interpolation=None, default_section="\x00")
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as err:
        raise CredentialsError(f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise CredentialsError(f"{path} is not UTF-8 text: {err}") from None
    except configparser.Error as err:
        raise CredentialsError(f"{path} is not a shared-credentials file: "
                               f"{' '.join(str(err).split())}") from None
    keys: dict[str, KeyPair] = {}
    for name in parser.sections():
        section = parser[name]
        values = {}
        for option in ("aws_access_key_id", "aws_secret_access_key"):
            value = (section.get(option) or "").strip()
            if not value:
                raise CredentialsError(f"{path}: section [{name}] has no {option}")
            values[option] = value
        key_id = values["aws_access_key_id"]
        if any(c.isspace() or c in "/,=" for c in key_id):
            raise CredentialsError(f"{path}: section [{name}]: aws_access_key_id {key_id!r} "
                                   "holds a character no signature can carry")
        if key_id in keys:
            raise CredentialsError(f"{path}: section [{name}]: aws_access_key_id {key_id} is "
                                   f"already in section [{keys[key_id].profile}]")
        token = (section.get("aws_session_token") or "").strip() or None
        keys[key_id] = KeyPair(key_id, values["aws_secret_access_key"], token, name)
    if not keys:
        raise CredentialsError(f"{path} holds no key pair (no [section] with aws_access_key_id "
                               "and aws_secret_access_key)")
    return keys


def signing_name(service: str) -> str:
    """The SigV4 signing name of a botocore service (`iot`, `iot-jobs-data`)."""
    import botocore.session

    return botocore.session.get_session().get_service_model(service).signing_name


def _stamp(t: datetime.datetime) -> str:
    return t.strftime(SIGV4_TIMESTAMP)


@functools.cache
def _botocore() -> dict[str, Any]:
    """botocore's signers, changed only in which headers they sign: exactly the ones the client
    listed in SignedHeaders (botocore, signing, leaves out User-Agent and a few others)."""
    from botocore.auth import SigV4Auth, SigV4QueryAuth
    from botocore.awsrequest import AWSRequest
    from botocore.compat import HTTPHeaders
    from botocore.credentials import Credentials

    class Signed:
        signed: list[str]

        def headers_to_sign(self, request: AWSRequest) -> HTTPHeaders:
            headers = HTTPHeaders()
            for name in self.signed:
                for value in request.headers.get_all(name) or ():
                    headers[name] = value
            return headers

    class HeaderSigner(Signed, SigV4Auth):
        pass

    class QuerySigner(Signed, SigV4QueryAuth):
        pass

    return {"AWSRequest": AWSRequest, "Credentials": Credentials, "header": HeaderSigner,
            "query": QuerySigner}


class Verifier:
    """Checks the SigV4 signature of requests for one signing name and region."""

    def __init__(self, keys: Mapping[str, KeyPair], service: str, region: str,
                 clock: Optional[Callable[[], datetime.datetime]] = None) -> None:
        self.keys = dict(keys)
        self.service = service
        self.region = region
        self._clock = clock or (lambda: datetime.datetime.now(datetime.UTC))
        _botocore()  # loaded now, not on the first request

    def verify(self, method: str, target: str, headers: Message, body: bytes
               ) -> Optional[Refusal]:
        """None when the request is signed by a known key pair; else why it is refused."""
        parts = urlsplit(target)
        query = [(unquote(k), unquote(v)) for k, _, v in
                 (p.partition("=") for p in parts.query.split("&") if p)]
        qdict = dict(query)
        authorization = headers.get("Authorization")
        presigned = "X-Amz-Algorithm" in qdict
        if authorization is not None and presigned:
            return Refusal("InvalidSignatureException", "Found both 'X-Amz-Algorithm' as a "
                           "query-string param and 'Authorization' as HTTP header.")
        if presigned:
            found = self._query_params(qdict)
        elif authorization is not None and authorization.strip().startswith("AWS4-"):
            found = self._header_params(authorization, headers)
        else:
            return Refusal("MissingAuthenticationTokenException", MISSING_TOKEN)
        if isinstance(found, Refusal):
            return found
        algorithm, credential, signed_headers, signature, date, expires = found
        key_id = credential.split("/", 1)[0] or None
        when = self._parse_date(date)
        if when is None:
            return Refusal("IncompleteSignatureException", "Date must be in ISO-8601 'basic "
                           f"format'. Got '{date.removeprefix('Date:')}'. "
                           "See http://en.wikipedia.org/wiki/ISO_8601", key_id)
        stamp = _stamp(when)
        now = self._clock().astimezone(datetime.UTC).replace(microsecond=0)
        if expires is not None:
            expires_at = when + datetime.timedelta(seconds=expires)
            if now > expires_at:
                return Refusal("InvalidSignatureException",
                               f"Signature expired: {stamp} is now earlier than "
                               f"{_stamp(now - datetime.timedelta(seconds=expires))} "
                               f"({_stamp(now)} - {expires} sec.)", key_id)
        elif when < now - MAX_SKEW:
            return Refusal("InvalidSignatureException",
                           f"Signature expired: {stamp} is now earlier than "
                           f"{_stamp(now - MAX_SKEW)} ({_stamp(now)} - 15 min.)", key_id)
        if when > now + MAX_SKEW:
            return Refusal("InvalidSignatureException",
                           f"Signature not yet current: {stamp} is still later than "
                           f"{_stamp(now + MAX_SKEW)} ({_stamp(now)} + 15 min.)", key_id)
        signed = [h.strip().lower() for h in signed_headers.split(";")]
        if "host" not in signed:
            return Refusal("InvalidSignatureException", "'Host' or ':authority' must be a "
                           "'SignedHeader' in the AWS Authorization.", key_id)
        if algorithm != ALGORITHM:
            return Refusal("IncompleteSignatureException",
                           f"Unsupported AWS 'algorithm': '{algorithm}' (only {ALGORITHM} "
                           "for now). ", key_id)
        scope = credential.rstrip("/").split("/")
        if len(scope) != 5:
            return Refusal("IncompleteSignatureException",
                           "Credential must have exactly 5 slash-delimited elements, e.g. "
                           f"keyid/date/region/service/term, got '{credential}'", key_id)
        key_id, scope_date, region, service, term = scope
        wrong = ""
        if region != self.region:
            wrong += f"Credential should be scoped to a valid region, not '{region}'. "
        if service != self.service:
            wrong += f"Credential should be scoped to correct service: '{self.service}'. "
        if term != "aws4_request":
            wrong += ("Credential should be scoped with a valid terminator: 'aws4_request', "
                      f"not '{term}'. ")
        if scope_date != stamp[:8]:
            wrong += ("Date in Credential scope does not match YYYYMMDD from ISO-8601 version "
                      f"of date from HTTP: '{scope_date}' != '{stamp[:8]}', from '{stamp}'.")
        if wrong:
            return Refusal("InvalidSignatureException", wrong, key_id)
        pair = self.keys.get(key_id)
        if pair is None:
            return Refusal("UnrecognizedClientException", BAD_TOKEN, key_id)
        mismatch = self._check_signature(pair, method, parts.path, query, headers, body,
                                         signed, stamp, signature, presigned)
        if mismatch is not None:
            return Refusal("InvalidSignatureException", mismatch, key_id)
        token = qdict.get("X-Amz-Security-Token") if presigned else headers.get(
            "X-Amz-Security-Token")
        if token is not None or pair.token is not None:
            if token is None or pair.token is None or not hmac.compare_digest(
                    token.encode(), pair.token.encode()):
                # AWS words this one without the final full stop
                return Refusal("UnrecognizedClientException", BAD_TOKEN[:-1], key_id)
        return None

    # -- the parts of a signature -------------------------------------------------------------
    @staticmethod
    def _header_params(authorization: str, headers: Message
                       ) -> tuple[str, str, str, str, str, None] | Refusal:
        text = authorization.strip()
        algorithm, _, rest = text.partition(" ")
        params: dict[str, str] = {}
        for piece in rest.split(","):
            piece = piece.strip()
            if not piece:
                continue
            name, eq, value = piece.partition("=")
            if not eq:
                return Refusal("IncompleteSignatureException",
                               f"'{piece}' not a valid key=value pair (missing equal-sign) in "
                               f"Authorization header: '{authorization}'.")
            params[name.strip()] = value.strip()
        message = ""
        for name in ("Credential", "Signature", "SignedHeaders"):
            if not params.get(name):
                message += f"Authorization header requires '{name}' parameter. "
        date = headers.get("X-Amz-Date")
        if date is None and headers.get("Date") is not None:
            date = "Date:" + headers["Date"]  # marked: the only place an HTTP-date may be
        if date is None:
            message += ("Authorization header requires existence of either a 'X-Amz-Date' or "
                        "a 'Date' header. ")
        if message:
            key_id = (params.get("Credential") or "").split("/", 1)[0] or None
            return Refusal("IncompleteSignatureException",
                           f"{message}Authorization={authorization}", key_id)
        assert date is not None
        return (algorithm, params["Credential"], params["SignedHeaders"], params["Signature"],
                date.strip(), None)

    @staticmethod
    def _query_params(qdict: dict[str, str]
                      ) -> tuple[str, str, str, str, str, Optional[int]] | Refusal:
        message = "".join(f"AWS query-string parameters must include '{name}'. "
                          for name in QUERY_PARAMS if not qdict.get(name))
        if message:
            key_id = (qdict.get("X-Amz-Credential") or "").split("/", 1)[0] or None
            return Refusal("IncompleteSignatureException",
                           f"{message}Re-examine the query-string parameters.", key_id)
        key_id = qdict["X-Amz-Credential"].split("/", 1)[0] or None
        expires: Optional[int] = None
        text = qdict.get("X-Amz-Expires")
        if text is not None:
            if not text.isdigit() or not 0 < int(text) <= MAX_EXPIRES:
                return Refusal("IncompleteSignatureException",
                               f"X-Amz-Expires must be a whole number of seconds from 1 to "
                               f"{MAX_EXPIRES} (a week), got '{text}'.", key_id)
            expires = int(text)
        return (qdict["X-Amz-Algorithm"], qdict["X-Amz-Credential"],
                qdict["X-Amz-SignedHeaders"], qdict["X-Amz-Signature"], qdict["X-Amz-Date"],
                expires)

    @staticmethod
    def _parse_date(text: str) -> Optional[datetime.datetime]:
        """X-Amz-Date (`YYYYMMDDTHHMMSSZ`), or a `Date:` header's HTTP-date."""
        try:
            if _DATE_RE.fullmatch(text):
                return datetime.datetime.strptime(text, SIGV4_TIMESTAMP).replace(
                    tzinfo=datetime.UTC)
            if not text.startswith("Date:"):
                return None
            when = parsedate_to_datetime(text[len("Date:"):])
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # `-0000`, as botocore writes it: HTTP dates are in GMT
            return when.replace(tzinfo=datetime.UTC)
        return when.astimezone(datetime.UTC)

    def _check_signature(self, pair: KeyPair, method: str, path: str,
                         query: list[tuple[str, str]], headers: Message, body: bytes,
                         signed: list[str], stamp: str, signature: str,
                         presigned: bool) -> Optional[str]:
        """None when `signature` is what botocore computes for this request and key pair."""
        body_hash = hashlib.sha256(body).hexdigest()
        claimed = headers.get("X-Amz-Content-SHA256")
        if claimed is not None and "x-amz-content-sha256" in signed and claimed != body_hash:
            return MISMATCH  # a signed body hash that is not the body's (or UNSIGNED-PAYLOAD)
        if presigned:
            query = [(k, v) for k, v in query if k != "X-Amz-Signature"]
        bc = _botocore()
        request = bc["AWSRequest"](method=method, url="http://jobsd.invalid" + (path or "/"),
                                   data=body, params=query)
        for name in signed:
            for value in headers.get_all(name) or ():
                request.headers[name] = value
        request.context["timestamp"] = stamp
        credentials = bc["Credentials"](pair.access_key, pair.secret_key, pair.token)
        signer = bc["query" if presigned else "header"](credentials, self.service, self.region)
        signer.signed = signed
        canonical = signer.canonical_request(request)
        string_to_sign = signer.string_to_sign(request, canonical)
        expected = signer.signature(string_to_sign, request)
        if hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
            return None
        return (f"{MISMATCH}\n\nThe Canonical String for this request should have been\n"
                f"'{canonical}'\n\nThe String-to-Sign should have been\n'{string_to_sign}'\n")
