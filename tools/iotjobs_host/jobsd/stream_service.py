"""Streams and OTA updates, the service side: the control plane (CreateStream ...
CreateOTAUpdate) and the device's stream requests (streams.py has the wire rules)."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Optional

from . import ota as otas
from . import streamfiles
from . import streams as sts
from .rules import ApiError
from .store import OtaUpdate, Stream
from .core import _not_found, _page, _StreamView, _Tracker

log = logging.getLogger("jobsd.service")


class StreamsApi:
    def stream_arn(self, stream_id: str) -> str:
        return f"arn:aws:iot:{self.region}:{self.account}:stream/{stream_id}"

    def ota_arn(self, ota_update_id: str) -> str:
        return f"arn:aws:iot:{self.region}:{self.account}:otaupdate/{ota_update_id}"

    def _files_root(self) -> str:
        if self.files is None:
            raise sts.invalid("streams need jobsd to run with --files DIR (s3://BUCKET/KEY is"
                              " DIR/BUCKET/KEY)")
        return self.files.root

    def _measure(self, files: list[sts.StreamFile]) -> list[dict[str, Any]]:
        """Record each file's size and SHA-256 now (its ETag for the device side)."""
        root = self._files_root()
        out = []
        for f in files:
            try:
                f.size, f.sha256 = streamfiles.measure(root, f.bucket, f.key)
            except streamfiles.Missing as err:
                raise _not_found(f"{err} (looked under the --files folder)") from None
            except streamfiles.Unreadable as err:
                raise sts.invalid(str(err)) from None
            out.append(f.to_json())
        return out

    def _stream_or_404(self, stream_id: str) -> Stream:
        if not sts.valid_id(stream_id):
            raise sts.invalid("streamId must match [a-zA-Z0-9_-]{1,128}")
        found = self._store.get_stream(stream_id)
        if found is None:
            raise _not_found(f"Stream {stream_id} cannot be found.")
        return found

    def _stream_changed(self, stream_id: str) -> None:
        self._streams.pop(stream_id, None)
        if self._blocks is not None:
            self._blocks.forget(stream_id)

    def _stream_reply(self, s: Stream) -> dict[str, Any]:
        out: dict[str, Any] = {"streamId": s.stream_id, "streamArn": self.stream_arn(s.stream_id)}
        if s.description is not None:
            out["description"] = s.description
        out["streamVersion"] = s.version
        return out

    def _insert_stream(self, stream_id: str, spec: sts.StreamSpec, files: list[dict[str, Any]]
                       ) -> Stream:
        now = self._stamp()
        stream = Stream(stream_id=stream_id, seq=self._store.next_counter("stream"), version=1,
                        description=spec.description, role_arn=spec.role_arn or "",
                        files=files, created_at=now, last_updated_at=now, tags=spec.tags)
        self._store.insert_stream(stream)
        self._stream_changed(stream_id)
        return stream

    # -- streams: control plane -------------------------------------------------------------------
    def create_stream(self, stream_id: str, body: dict[str, Any]) -> dict[str, Any]:
        spec = sts.parse_create(stream_id, body)
        assert spec.files is not None
        files = self._measure(spec.files)  # outside the lock: hashing takes a while

        def op(_: _Tracker, __: int) -> dict[str, Any]:
            if self._store.get_stream(stream_id) is not None:
                raise ApiError("ResourceAlreadyExistsException", 409,
                               f"Stream {stream_id} already exists.", resourceId=stream_id,
                               resourceArn=self.stream_arn(stream_id))
            return self._stream_reply(self._insert_stream(stream_id, spec, files))
        return self._run(op)

    def describe_stream(self, stream_id: str) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            s = self._stream_or_404(stream_id)
            info = {"streamId": s.stream_id, "streamArn": self.stream_arn(s.stream_id),
                    "streamVersion": s.version}
            if s.description is not None:
                info["description"] = s.description
            info.update(files=[{"fileId": f["fileId"],
                                "s3Location": sts.StreamFile.from_json(f).s3_location()}
                               for f in s.files],
                        createdAt=s.created_at, lastUpdatedAt=s.last_updated_at,
                        roleArn=s.role_arn)
            return {"streamInfo": info}
        return self._run(op)

    def list_streams(self, max_results: Optional[int], token: Optional[str],
                     ascending: bool) -> dict[str, Any]:
        """Creation order; newest first unless isAscendingOrder=true."""
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            found = self._store.list_streams()
            if not ascending:
                found.reverse()
            rows = []
            for s in found:
                row: dict[str, Any] = {"streamId": s.stream_id,
                                       "streamArn": self.stream_arn(s.stream_id),
                                       "streamVersion": s.version}
                if s.description is not None:
                    row["description"] = s.description
                rows.append(row)
            return _page(rows, "streams", max_results, token, limit=sts.MAX_RESULTS)
        return self._run(op)

    def update_stream(self, stream_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """Every update adds one to the version and records the files' content anew (the
        operator's way to accept a changed file)."""
        spec = sts.parse_update(stream_id, body)

        def op(_: _Tracker, __: int) -> dict[str, Any]:
            s = self._stream_or_404(stream_id)
            if s.version >= sts.MAX_VERSION:
                raise ApiError("LimitExceededException", 410,
                               f"Stream {stream_id} is at version {sts.MAX_VERSION}, the"
                               " highest a stream can have.")
            files = spec.files if spec.files is not None else [
                sts.StreamFile.from_json(f) for f in s.files]
            s.files = self._measure(files)
            if spec.description is not None:
                s.description = spec.description
            if spec.role_arn is not None:
                s.role_arn = spec.role_arn
            s.version += 1
            s.last_updated_at = self._stamp()
            self._store.save_stream(s)
            self._stream_changed(stream_id)
            return self._stream_reply(s)
        return self._run(op)

    def delete_stream(self, stream_id: str) -> None:
        def op(_: _Tracker, __: int) -> None:
            self._stream_or_404(stream_id)
            users = self._store.ota_updates_using_stream(stream_id)
            if users:
                raise ApiError("DeleteConflictException", 409,
                               f"Stream {stream_id} is used by OTA update {users[0]}; delete"
                               " the OTA update first.")
            self._store.delete_stream(stream_id)
            self._stream_changed(stream_id)
        self._run(op)

    # -- streams: device side (MQTT) --------------------------------------------------------------
    def _stream_view(self, stream_id: str, token: Optional[str]) -> _StreamView:
        with self.lock:
            if self.stream_fault is not None:
                raise sts.StreamError(self.stream_fault, "Internal error", token)
            if stream_id not in self._streams:
                s = self._store.get_stream(stream_id)
                self._streams[stream_id] = None if s is None else _StreamView(
                    s.stream_id, s.version, s.description,
                    {f["fileId"]: sts.StreamFile.from_json(f) for f in s.files})
            view = self._streams[stream_id]
        if view is None:
            raise sts.StreamError("ResourceNotFound", f"Stream {stream_id} does not exist", token)
        return view

    def stream_describe(self, stream_id: str, token: Optional[str]
                        ) -> tuple[int, Optional[str], list[tuple[int, int]]]:
        """DescribeStream: (version, description, [(fileId, size)])."""
        view = self._stream_view(stream_id, token)
        return view.version, view.description, [(f.file_id, f.size)
                                                 for f in view.files.values()]

    def stream_blocks(self, stream_id: str, req: sts.GetRequest
                      ) -> tuple[list[int], memoryview]:
        """GetStream: the absolute indexes of the blocks to send and the file's bytes. No SQL
        and no hashing on the way once a stream file is cached (streamfiles.py)."""
        view = self._stream_view(stream_id, req.token)
        if req.version is not None and req.version != view.version:
            raise sts.StreamError("VersionMismatch", f"Stream {stream_id} is at version"
                                  f" {view.version}, not {req.version}", req.token)
        f = view.files.get(req.file_id)
        if f is None:
            raise sts.StreamError("ResourceNotFound", f"Stream {stream_id} has no file"
                                  f" {req.file_id}", req.token)
        with self.lock:
            if self._blocks is None or self.files is None or self._blocks.root != self.files.root:
                if self.files is None:
                    raise sts.StreamError("Unauthorized", "jobsd serves no files folder",
                                          req.token)
                self._blocks = streamfiles.BlockSource(self.files.root)
            blocks = self._blocks
            strict = self.stream_strict_eof
        data = blocks.content(stream_id, view.version, f.file_id, f.bucket, f.key, f.size,
                              f.sha256, req.token)
        return sts.select_blocks(req, len(data), strict), data

    # -- OTA updates ------------------------------------------------------------------------------
    def _ota_or_404(self, ota_update_id: str) -> OtaUpdate:
        if not sts.valid_id(ota_update_id):
            raise sts.invalid("otaUpdateId must match [a-zA-Z0-9_-]{1,128}")
        found = self._store.get_ota_update(ota_update_id)
        if found is None:
            raise _not_found(f"OTA update {ota_update_id} cannot be found.")
        return found

    def create_ota_update(self, ota_update_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """Checks what can be checked at once and records the update CREATE_PENDING; a worker
        then creates the stream and the job (`_complete_ota`) and sets CREATE_COMPLETE."""
        spec = otas.parse_create(ota_update_id, body)
        for arn in spec.targets:
            self._target_from_arn(arn)
        job_id = otas.JOB_PREFIX + ota_update_id

        def op(_: _Tracker, __: int) -> dict[str, Any]:
            if self._store.get_ota_update(ota_update_id) is not None:
                raise ApiError("ResourceAlreadyExistsException", 409,
                               f"OTA update {ota_update_id} already exists.",
                               resourceId=ota_update_id, resourceArn=self.ota_arn(ota_update_id))
            if self._store.get_job(job_id) is not None:
                raise ApiError("ResourceAlreadyExistsException", 409,
                               f"Job {job_id} already exists.", resourceId=job_id,
                               resourceArn=self.job_arn(job_id))
            for arn in spec.targets:
                kind, name = self._target_from_arn(arn)
                if kind == "thing" and self._store.get_thing(name) is None:
                    raise _not_found(f"Thing {name} cannot be found.")
                if kind == "thinggroup":
                    self._group_or_404(name)
            self._ota_entries(spec)  # every file exists (ResourceNotFound otherwise)
            now = self._stamp()
            self._store.insert_ota_update(OtaUpdate(
                ota_update_id=ota_update_id, seq=self._store.next_counter("ota"),
                status="CREATE_PENDING", request=body, job_id=job_id, created_at=now,
                last_updated_at=now))
            return {"otaUpdateId": ota_update_id, "awsIotJobId": job_id,
                    "otaUpdateArn": self.ota_arn(ota_update_id),
                    "awsIotJobArn": self.job_arn(job_id), "otaUpdateStatus": "CREATE_PENDING"}
        out = self._run(op)
        threading.Thread(target=self._complete_ota, args=(ota_update_id,),
                         name=f"ota-{ota_update_id}", daemon=True).start()
        return out

    def _ota_entries(self, spec: otas.OtaSpec, stream_id: Optional[str] = None
                     ) -> list[dict[str, Any]]:
        """fileid, filesize, bucket and key of each file of an update (under the lock)."""
        out = []
        for f in spec.files:
            if f.stream is not None:
                s = self._store.get_stream(f.stream[0])
                if s is None:
                    raise _not_found(f"Stream {f.stream[0]} cannot be found.")
                match = [x for x in s.files if x["fileId"] == f.stream[1]]
                if not match:
                    raise sts.invalid(f"Stream {f.stream[0]} has no fileId {f.stream[1]}")
                out.append({"fileid": f.stream[1], "filesize": match[0]["size"],
                            "bucket": match[0]["bucket"], "key": match[0]["key"]})
                continue
            assert f.s3 is not None
            bucket, key, _ = f.s3
            size = None
            if stream_id is not None:
                s = self._store.get_stream(stream_id)
                match = [x for x in (s.files if s else []) if x["fileId"] == f.index]
                size = match[0]["size"] if match else None
            if size is None:
                try:
                    size = streamfiles.measure(self._files_root(), bucket, key)[0]
                except streamfiles.Missing as err:
                    raise _not_found(f"{err} (looked under the --files folder)") from None
                except streamfiles.Unreadable as err:
                    raise sts.invalid(str(err)) from None
            out.append({"fileid": f.index, "filesize": size, "bucket": bucket, "key": key})
        return out

    def _complete_ota(self, ota_update_id: str) -> None:
        """CREATE_PENDING -> the stream (MQTT, s3Location files), the job, CREATE_COMPLETE; or
        CREATE_FAILED with errorInfo. Safe to run again after a restart."""
        try:
            with self.lock:
                found = self._store.get_ota_update(ota_update_id)
                if found is None or found.status != "CREATE_PENDING":
                    return
                ota = found
            body = ota.request
            spec = otas.parse_create(ota_update_id, body)

            def stream_op(_: _Tracker, __: int) -> Optional[str]:
                current = self._store.get_ota_update(ota_update_id)
                if current is None:
                    return None
                if current.stream_id is not None or not spec.mqtt:
                    return current.stream_id
                if spec.files[0].stream is not None:
                    current.stream_id = spec.files[0].stream[0]
                else:
                    stream_id = otas.new_stream_id()
                    files = [sts.StreamFile(f.index, *f.s3) for f in spec.files  # type: ignore[misc]
                             if f.s3 is not None]
                    self._insert_stream(stream_id, sts.StreamSpec(
                        spec.description, files, spec.role_arn), self._measure(files))
                    current.stream_id, current.stream_created = stream_id, True
                current.last_updated_at = self._stamp()
                self._store.save_ota_update(current)
                return current.stream_id
            stream_id = self._run(stream_op)
            with self.lock:
                entries = self._ota_entries(spec, stream_id)
                exists = self._store.get_job(ota.job_id) is not None
            if not exists:
                job: dict[str, Any] = {
                    "targets": spec.targets, "targetSelection": spec.target_selection,
                    "document": json.dumps(otas.document(spec, stream_id, entries))}
                if spec.description is not None:
                    job["description"] = spec.description
                for ours, theirs in (("awsJobPresignedUrlConfig", "presignedUrlConfig"),
                                     ("awsJobTimeoutConfig", "timeoutConfig")):
                    if isinstance(body.get(ours), dict):
                        job[theirs] = body[ours]
                self.create_job(ota.job_id, job)
            self._ota_status(ota_update_id, "CREATE_COMPLETE", None)
        except ApiError as err:
            log.warning("OTA update %s failed: %s", ota_update_id, err)
            self._ota_status(ota_update_id, "CREATE_FAILED",
                             {"code": err.error_type, "message": err.message})
        except Exception as err:  # a worker thread: record, never raise
            log.exception("OTA update %s failed", ota_update_id)
            self._ota_status(ota_update_id, "CREATE_FAILED",
                             {"code": "InternalFailureException", "message": str(err)[:500]})

    def _ota_status(self, ota_update_id: str, status: str,
                    error: Optional[dict[str, str]]) -> None:
        def op(_: _Tracker, __: int) -> None:
            current = self._store.get_ota_update(ota_update_id)
            if current is None:
                return
            current.status, current.error = status, error
            current.last_updated_at = self._stamp()
            self._store.save_ota_update(current)
        self._run(op)

    def resume_ota_updates(self) -> None:
        """At start-up: finish the updates a stop left CREATE_PENDING."""
        with self.lock:
            pending = [o.ota_update_id for o in self._store.list_ota_updates()
                       if o.status == "CREATE_PENDING"]
        for ota_update_id in pending:
            threading.Thread(target=self._complete_ota, args=(ota_update_id,),
                             name=f"ota-{ota_update_id}", daemon=True).start()

    def get_ota_update(self, ota_update_id: str) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            o = self._ota_or_404(ota_update_id)
            body = o.request
            info: dict[str, Any] = {"otaUpdateId": o.ota_update_id,
                                    "otaUpdateArn": self.ota_arn(o.ota_update_id),
                                    "creationDate": o.created_at,
                                    "lastModifiedDate": o.last_updated_at}
            for member in ("description", "targets", "awsJobExecutionsRolloutConfig",
                           "awsJobPresignedUrlConfig", "additionalParameters"):
                if body.get(member) is not None:
                    info[member] = body[member]
            info["protocols"] = body.get("protocols", ["MQTT"])
            info["targetSelection"] = body.get("targetSelection", "SNAPSHOT")
            info["otaUpdateFiles"] = body["files"]
            info["otaUpdateStatus"] = o.status
            if o.status == "CREATE_COMPLETE" or self._store.get_job(o.job_id) is not None:
                info["awsIotJobId"] = o.job_id
                info["awsIotJobArn"] = self.job_arn(o.job_id)
            if o.error is not None:
                info["errorInfo"] = o.error
            return {"otaUpdateInfo": info}
        return self._run(op)

    def list_ota_updates(self, status: Optional[str], max_results: Optional[int],
                         token: Optional[str]) -> dict[str, Any]:
        if status is not None and status not in otas.STATUSES:
            raise sts.invalid(f"otaUpdateStatus must be one of {', '.join(otas.STATUSES)}")

        def op(_: _Tracker, __: int) -> dict[str, Any]:
            rows = [{"otaUpdateId": o.ota_update_id, "otaUpdateArn": self.ota_arn(o.ota_update_id),
                     "creationDate": o.created_at}
                    for o in reversed(self._store.list_ota_updates())
                    if status is None or o.status == status]
            return _page(rows, "otaUpdates", max_results, token)
        return self._run(op)

    def delete_ota_update(self, ota_update_id: str, delete_stream: bool,
                          force_delete_job: bool) -> None:
        """The OTA record; with forceDeleteAWSJob also its job (even IN_PROGRESS), with
        deleteStream also the stream it created (a stream the caller supplied stays)."""
        with self.lock:
            o = self._ota_or_404(ota_update_id)
        if force_delete_job and self._job_exists(o.job_id):
            self.delete_job(o.job_id, True)

        def op(_: _Tracker, __: int) -> None:
            current = self._ota_or_404(ota_update_id)
            self._store.delete_ota_update(ota_update_id)
            if delete_stream and current.stream_created and current.stream_id is not None:
                if (self._store.get_stream(current.stream_id) is not None
                        and not self._store.ota_updates_using_stream(current.stream_id)):
                    self._store.delete_stream(current.stream_id)
                    self._stream_changed(current.stream_id)
        self._run(op)

    def _job_exists(self, job_id: str) -> bool:
        with self.lock:
            return self._store.get_job(job_id) is not None
