"""AWS IoT OTA updates (CreateOTAUpdate and friends), the minimal part jobsd implements: request
validation and the `afr_ota` job document. Pure functions; `Service` does the work.

Sources: botocore's `iot` model (CreateOTAUpdate, GetOTAUpdate, ListOTAUpdates, DeleteOTAUpdate)
and STREAMS.md 6 (the document schema of the FreeRTOS OTA agent and the Jobs library). Choices
where STREAMS.md marks [infer]:

* `protocols` defaults to ["MQTT"], `targetSelection` to SNAPSHOT;
* the signature key is `sig-<hashAlgorithm>-<signatureAlgorithm>` in lower case (default
  SHA256 / ECDSA: `sig-sha256-ecdsa`); its value is `customCodeSigning.signature.inlineDocument`
  as it travels (base64 of the signature bytes); `certfile` is `certificateChain.certificateName`;
* only `customCodeSigning` (or no code signing) is supported: `awsSignerJobId` and
  `startSigningJobParameter` need AWS Signer and are refused with InvalidRequestException;
* the MQTT files of one update must come from one stream (the document has one `streamname`):
  all `s3Location` (jobsd creates `AFR_OTA-<uuid>` with fileId = the file's index) or all the
  same `fileLocation.stream.streamId`;
* the job id is `AFR_OTA-<otaUpdateId>` and must fit the 64-character job id, so the update id
  is at most 56 characters here;
* the Create reply already names the job (`awsIotJobId`, `awsIotJobArn`) while the status is
  CREATE_PENDING; GetOTAUpdate reports CREATE_COMPLETE once the stream and the job exist.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import quote

from . import streams as st
from .rules import ApiError, is_int

JOB_PREFIX = STREAM_PREFIX = "AFR_OTA-"
MAX_OTA_ID = 64 - len(JOB_PREFIX)
PROTOCOLS = ("MQTT", "HTTP")
STATUSES = ("CREATE_PENDING", "CREATE_IN_PROGRESS", "CREATE_COMPLETE", "CREATE_FAILED",
            "DELETE_IN_PROGRESS", "DELETE_FAILED")
AUTH_SCHEME = "aws.s3.presigned"
MAX_DOC_FILES = 10          # the Jobs-library parser reads files[0..9]


def invalid(message: str) -> ApiError:
    return ApiError("InvalidRequestException", 400, message)


@dataclass
class OtaFile:
    index: int
    name: Optional[str]
    file_type: Optional[int]
    s3: Optional[tuple[str, str, Optional[str]]]     # bucket, key, version
    stream: Optional[tuple[str, int]]                # streamId, fileId
    signature: Optional[str]                         # base64 text
    sig_key: str
    cert_name: Optional[str]


@dataclass
class OtaSpec:
    protocols: list[str]
    target_selection: str
    targets: list[str]
    files: list[OtaFile]
    role_arn: str
    description: Optional[str]

    @property
    def mqtt(self) -> bool:
        return "MQTT" in self.protocols

    @property
    def http(self) -> bool:
        return "HTTP" in self.protocols


def _signing(value: Any, what: str) -> tuple[Optional[str], str, Optional[str]]:
    """(signature base64, sig-... key, certificate name) of `codeSigning`."""
    if value is None:
        return None, "sig-sha256-ecdsa", None
    if not isinstance(value, dict):
        raise invalid(f"{what}.codeSigning must be an object")
    for unsupported in ("awsSignerJobId", "startSigningJobParameter"):
        if value.get(unsupported) is not None:
            raise invalid(f"{what}.codeSigning.{unsupported} needs AWS Signer, which jobsd does"
                          " not have; use customCodeSigning")
    custom = value.get("customCodeSigning")
    if custom is None:
        return None, "sig-sha256-ecdsa", None
    if not isinstance(custom, dict):
        raise invalid(f"{what}.codeSigning.customCodeSigning must be an object")
    signature = custom.get("signature")
    inline = signature.get("inlineDocument") if isinstance(signature, dict) else None
    if not isinstance(inline, str) or not inline:
        raise invalid(f"{what}.codeSigning.customCodeSigning.signature.inlineDocument is"
                      " required (the signature bytes)")
    try:
        base64.b64decode(inline, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{what}: the signature is not valid base64") from None
    names = []
    for member, default in (("hashAlgorithm", "SHA256"), ("signatureAlgorithm", "ECDSA")):
        v = custom.get(member, default)
        if not isinstance(v, str) or not v.isalnum():
            raise invalid(f"{what}.codeSigning.customCodeSigning.{member} must be a name such"
                          f" as {default}")
        names.append(v.lower())
    chain = custom.get("certificateChain")
    cert = None
    if chain is not None:
        if not isinstance(chain, dict):
            raise invalid(f"{what}.codeSigning.customCodeSigning.certificateChain must be an"
                          " object")
        cert = chain.get("certificateName")
        if cert is not None and not isinstance(cert, str):
            raise invalid(f"{what}: certificateChain.certificateName must be a string")
    return inline, f"sig-{names[0]}-{names[1]}", cert


def _file(i: int, item: Any) -> OtaFile:
    what = f"files[{i}]"
    if not isinstance(item, dict):
        raise invalid(f"{what} must be an object")
    name = item.get("fileName")
    if name is not None and (not isinstance(name, str) or not name):
        raise invalid(f"{what}.fileName must be a non-empty string")
    file_type = item.get("fileType")
    if file_type is not None and (not is_int(file_type) or not 0 <= file_type <= 255):
        raise invalid(f"{what}.fileType must be an integer in 0..255")
    location = item.get("fileLocation")
    if not isinstance(location, dict):
        raise invalid(f"{what}.fileLocation is required (stream or s3Location)")
    stream, s3 = location.get("stream"), location.get("s3Location")
    if (stream is None) == (s3 is None):
        raise invalid(f"{what}.fileLocation must hold exactly one of stream and s3Location")
    where_stream = None
    where_s3 = None
    if stream is not None:
        if not isinstance(stream, dict) or not st.valid_id(stream.get("streamId")):
            raise invalid(f"{what}.fileLocation.stream.streamId must match [a-zA-Z0-9_-]{{1,128}}")
        file_id = stream.get("fileId", 0)
        if not is_int(file_id) or not 0 <= file_id <= st.MAX_FILE_ID:
            raise invalid(f"{what}.fileLocation.stream.fileId must be an integer in 0..255")
        where_stream = (stream["streamId"], file_id)
    else:
        where_s3 = st.s3_location(s3, f"{what}.fileLocation")
    signature, sig_key, cert = _signing(item.get("codeSigning"), what)
    return OtaFile(i, name, file_type, where_s3, where_stream, signature, sig_key, cert)


def parse_create(ota_id: str, body: dict[str, Any]) -> OtaSpec:
    if not st.valid_id(ota_id):
        raise invalid("otaUpdateId must match [a-zA-Z0-9_-]{1,128}")
    if len(ota_id) > MAX_OTA_ID:
        raise invalid(f"otaUpdateId is at most {MAX_OTA_ID} characters in jobsd: the job"
                      f" {JOB_PREFIX}<otaUpdateId> must fit a 64-character job id")
    protocols = body.get("protocols", ["MQTT"])
    if (not isinstance(protocols, list) or not 1 <= len(protocols) <= 2
            or any(p not in PROTOCOLS for p in protocols) or len(set(protocols)) != len(protocols)):
        raise invalid("protocols must list MQTT and/or HTTP, each once")
    selection = body.get("targetSelection", "SNAPSHOT")
    if selection not in ("SNAPSHOT", "CONTINUOUS"):
        raise invalid("targetSelection must be SNAPSHOT or CONTINUOUS")
    targets = body.get("targets")
    if not isinstance(targets, list) or not targets or not all(
            isinstance(t, str) for t in targets):
        raise invalid("targets must be a non-empty list of thing or thing-group ARNs")
    files = body.get("files")
    if not isinstance(files, list) or not files:
        raise invalid("files must be a non-empty list")
    if len(files) > MAX_DOC_FILES:
        raise invalid(f"an OTA update carries at most {MAX_DOC_FILES} files in jobsd (the"
                      " devices' job parser reads no more)")
    if body.get("roleArn") is None:
        raise invalid("roleArn is required")
    spec = OtaSpec(list(protocols), selection, list(targets),
                   [_file(i, f) for i, f in enumerate(files)], st.role_arn(body["roleArn"]),
                   st.text(body, "description"))
    if spec.mqtt:
        sources = {("s3", None) if f.s3 is not None else ("stream", f.stream[0])  # type: ignore[index]
                   for f in spec.files}
        if len(sources) != 1:
            raise invalid("for MQTT, all files must be s3Location files or all come from one"
                          " stream (the job document names one streamname)")
    return spec


def new_stream_id() -> str:
    return f"{STREAM_PREFIX}{uuid.uuid4()}"


def placeholder(bucket: str, key: str) -> str:
    """The presigned-URL placeholder jobsd replaces at delivery (files.py)."""
    return f"${{aws:iot:s3-presigned-url:https://s3.amazonaws.com/{bucket}/{quote(key)}}}"


def document(spec: OtaSpec, stream_id: Optional[str], entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The `afr_ota` job document (STREAMS.md 6.1). `entries[i]`: `fileid`, `filesize` and, for
    HTTP, `bucket` / `key` of file i."""
    files = []
    for f, e in zip(spec.files, entries, strict=True):
        out: dict[str, Any] = {}
        if f.name is not None:
            out["filepath"] = f.name
        out["filesize"] = e["filesize"]
        out["fileid"] = e["fileid"]
        if f.cert_name is not None:
            out["certfile"] = f.cert_name
        if f.file_type is not None:
            out["fileType"] = f.file_type
        if spec.http:
            out["update_data_url"] = placeholder(e["bucket"], e["key"])
            out["auth_scheme"] = AUTH_SCHEME
        if f.signature is not None:
            out[f.sig_key] = f.signature
        files.append(out)
    body: dict[str, Any] = {"protocols": spec.protocols}
    if spec.mqtt and stream_id is not None:
        body["streamname"] = stream_id
    body["files"] = files
    return {"afr_ota": body}
