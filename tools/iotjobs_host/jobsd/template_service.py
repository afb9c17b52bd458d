"""Job templates: custom ones (CreateJobTemplate ...) and the AWS managed catalog, and
CreateJob from a template with `documentParameters` substitution (FLEET.md 5).

A custom template is one row of the store: its description, its document (or the
`documentSource` it was created with, read again by each CreateJob that uses it), the five job
configs and `maintenanceWindows`, as CreateJobTemplate received or copied them. The managed
templates are a fixed catalog (managed_templates.py).

CreateJob with `jobTemplateArn` (`_resolve_template`, called by jobs.py before anything else):
* a custom template (`arn:aws:iot:<region>:<account>:jobtemplate/<id>`) gives the document and
  every config the request leaves out; its `maintenanceWindows` become
  `schedulingConfig.maintenanceWindows` unless the request sets them; an omitted description is
  the template's;
* a managed template (`arn:aws:iot:<region>::jobtemplate/<name>:<version>`) gives the document
  with its `${aws:iot:parameter:KEY}` placeholders replaced by `documentParameters`: a required
  key missing, a key the template does not take or a value that does not fully match the key's
  regex is an InvalidRequestException, an omitted optional key becomes "" [P]; values are
  JSON-escaped, so any text lands in the document as that text. The placeholder form is kept
  (GetJobDocument `beforeSubstitution=true`).
`documentParameters` without a managed template, and `document`/`documentSource` beside a
template, are InvalidRequestException [P]; an unknown template is ResourceNotFoundException.
"""
from __future__ import annotations

import json
import re
import unicodedata
from typing import Any, Optional

from . import managed_templates as managed
from .core import MAX_PRESIGN, MIN_PRESIGN, _invalid, _not_found, _page, _Tracker
from .rules import MAX_DESCRIPTION, MAX_STEP_MINUTES, ApiError, is_int, valid_job_id

# The five job configs a template carries (and CreateJob inherits from it).
CONFIGS = ("presignedUrlConfig", "jobExecutionsRolloutConfig", "abortConfig", "timeoutConfig",
           "jobExecutionsRetryConfig")
MAX_ARN = 1600
MAX_PARAMETER_VALUE = 30720
MAX_WINDOW_MINUTES = 1430
MAX_MANAGED_NAME = 64

_TEMPLATE_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_ARN = re.compile(r"arn:[!-~]+")
_TEMPLATE_ARN = re.compile(r"arn:aws:iot:([^:]*):([^:]*):jobtemplate/(.+)")
_JOB_ARN = re.compile(r"arn:aws:iot:([^:]*):([^:]*):job/(.+)")
_PARAMETER_KEY = re.compile(r"[a-zA-Z0-9_-]{1,128}")
_PLACEHOLDER = re.compile(r"\$\{aws:iot:parameter:([a-zA-Z0-9_-]+)\}")
_VERSION = re.compile(r"^[1-9]+.[0-9]+")  # the model's pattern, as it is written (re.match)


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch).startswith("C") for ch in text)


def substitute(document: str, values: dict[str, str]) -> str:
    """`document` with each `${aws:iot:parameter:KEY}` of `values` replaced by the value,
    escaped for the JSON string the placeholder stands in."""
    def one(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in values:
            return m.group(0)
        return json.dumps(values[key], ensure_ascii=False)[1:-1]
    return _PLACEHOLDER.sub(one, document)


def _check_configs(body: dict[str, Any]) -> None:
    """Type and range checks of the configs a template (or a job made from it) carries; the
    campaign's own rules (rollout, abort, retry, windows) are campaign.py's."""
    timeout = body.get("timeoutConfig")
    if timeout is not None:
        if not isinstance(timeout, dict):
            raise _invalid("timeoutConfig must be an object")
        minutes = timeout.get("inProgressTimeoutInMinutes")
        if minutes is not None and not (is_int(minutes) and 1 <= minutes <= MAX_STEP_MINUTES):
            raise _invalid(f"inProgressTimeoutInMinutes must be 1..{MAX_STEP_MINUTES}")
    presign = body.get("presignedUrlConfig")
    if presign is not None:
        if not isinstance(presign, dict):
            raise _invalid("presignedUrlConfig must be an object")
        expires = presign.get("expiresInSec")
        if expires is not None and not (is_int(expires) and MIN_PRESIGN <= expires <= MAX_PRESIGN):
            raise _invalid(f"presignedUrlConfig.expiresInSec must be {MIN_PRESIGN}..{MAX_PRESIGN}")
        role = presign.get("roleArn")
        if role is not None and (not isinstance(role, str) or not 20 <= len(role) <= 2048):
            raise _invalid("presignedUrlConfig.roleArn must be 20..2048 characters")
    rollout = body.get("jobExecutionsRolloutConfig")
    if rollout is not None:
        if not isinstance(rollout, dict):
            raise _invalid("jobExecutionsRolloutConfig must be an object")
        most = rollout.get("maximumPerMinute")
        if most is not None and not (is_int(most) and most >= 1):
            raise _invalid("jobExecutionsRolloutConfig.maximumPerMinute must be an integer >= 1")
        ramp = rollout.get("exponentialRate")
        if ramp is not None and not isinstance(ramp, dict):
            raise _invalid("jobExecutionsRolloutConfig.exponentialRate must be an object")
    for name, most in (("abortConfig", None), ("jobExecutionsRetryConfig", 2)):
        config = body.get(name)
        if config is None:
            continue
        if not isinstance(config, dict):
            raise _invalid(f"{name} must be an object")
        criteria = config.get("criteriaList")
        if (not isinstance(criteria, list) or not criteria
                or not all(isinstance(c, dict) for c in criteria)
                or (most is not None and len(criteria) > most)):
            raise _invalid(f"{name}.criteriaList must be a list of 1..{most or 'n'} objects")
    windows = body.get("maintenanceWindows")
    if windows is not None:
        if not isinstance(windows, list):
            raise _invalid("maintenanceWindows must be a list")
        for w in windows:
            if not isinstance(w, dict):
                raise _invalid("each maintenance window must be an object")
            start, minutes = w.get("startTime"), w.get("durationInMinutes")
            if not isinstance(start, str) or not 1 <= len(start) <= 256:
                raise _invalid("maintenanceWindows[].startTime must be a cron expression of"
                               " 1..256 characters")
            if not (is_int(minutes) and 1 <= minutes <= MAX_WINDOW_MINUTES):
                raise _invalid(f"maintenanceWindows[].durationInMinutes must be"
                               f" 1..{MAX_WINDOW_MINUTES}")
    tags = body.get("tags")
    if tags is not None:
        if not isinstance(tags, list):
            raise _invalid("tags must be a list of {Key, Value}")
        for tag in tags:
            key = tag.get("Key") if isinstance(tag, dict) else None
            value = tag.get("Value", "") if isinstance(tag, dict) else None
            if not isinstance(key, str) or not 1 <= len(key) <= 128:
                raise _invalid("tags[].Key must be 1..128 characters")
            if not isinstance(value, str) or len(value) > 256:
                raise _invalid("tags[].Value must be at most 256 characters")


class TemplatesApi:
    def template_arn(self, template_id: str) -> str:
        return f"arn:aws:iot:{self.region}:{self.account}:jobtemplate/{template_id}"

    @staticmethod
    def _check_template_id(template_id: str) -> None:
        if not _TEMPLATE_ID.fullmatch(template_id):
            raise _invalid("jobTemplateId must match [a-zA-Z0-9_-]{1,64}")

    def _validate_template_configs(self, body: dict[str, Any]) -> None:
        _check_configs(body)
        if body.get("destinationPackageVersions") is not None:
            raise _invalid("destinationPackageVersions is not supported by jobsd")
        validate = getattr(self, "_validate_campaign", None)
        if validate is not None:
            # as CreateJob would carry them: windows inside schedulingConfig
            as_job = {k: body[k] for k in ("jobExecutionsRolloutConfig", "abortConfig",
                                           "jobExecutionsRetryConfig") if body.get(k) is not None}
            if body.get("maintenanceWindows") is not None:
                as_job["schedulingConfig"] = {"maintenanceWindows": body["maintenanceWindows"]}
            validate(as_job)

    def _job_id_of(self, arn: Any) -> str:
        """The job id of CreateJobTemplate's `jobArn` (a job of this region and account)."""
        m = _JOB_ARN.fullmatch(arn) if isinstance(arn, str) else None
        if m is None or not valid_job_id(m.group(3)):
            raise _invalid("jobArn must be a job ARN, arn:aws:iot:<region>:<account>:job/<jobId>")
        if (m.group(1), m.group(2)) != (self.region, self.account):
            raise _not_found(f"Job {arn} does not exist in {self.region}/{self.account}")
        return m.group(3)

    # -- custom templates ----------------------------------------------------------------------
    def create_job_template(self, template_id: str, body: dict[str, Any]) -> dict[str, Any]:
        self._check_template_id(template_id)
        description = body.get("description")
        if description is None:
            raise _invalid("description is required")
        if (not isinstance(description, str) or not 1 <= len(description) <= MAX_DESCRIPTION
                or _has_control(description)):
            raise _invalid(f"description must be 1..{MAX_DESCRIPTION} characters without control"
                           " characters")
        given = [k for k in ("jobArn", "document", "documentSource") if body.get(k) is not None]
        if len(given) != 1:
            raise _invalid("Send exactly one of jobArn, document or documentSource"
                           + (f" (got {', '.join(given)})" if given else ""))
        stored: dict[str, Any] = {"description": description}
        job_id: Optional[str] = None
        if given[0] == "document":
            stored["document"] = self._document_from({"document": body["document"]})
        elif given[0] == "documentSource":
            self._document_from({"documentSource": body["documentSource"]})  # readable now
            stored["documentSource"] = body["documentSource"]
        else:
            job_id = self._job_id_of(body["jobArn"])
        self._validate_template_configs(body)
        own = {k: body[k] for k in CONFIGS + ("maintenanceWindows", "tags")
               if body.get(k) is not None}

        def op(_: _Tracker, __: int) -> dict[str, Any]:
            if self._store.get_template(template_id) is not None:
                raise ApiError("ConflictException", 409,
                               f"Job template {template_id} already exists.",
                               resourceId=template_id)
            if job_id is not None:  # the job's document and configs; the request's own win
                job = self._store.get_job(job_id)
                if job is None:
                    raise _not_found(f"Job {job_id} cannot be found.")
                stored["document"] = job.document
                stored.update({k: job.config[k] for k in CONFIGS if k in job.config})
                windows = (job.config.get("schedulingConfig") or {}).get("maintenanceWindows")
                if windows:
                    stored["maintenanceWindows"] = windows
            stored.update(own)
            self._store.insert_template(template_id, stored, round(self._clock(), 3))
            return {"jobTemplateArn": self.template_arn(template_id),
                    "jobTemplateId": template_id}
        return self._run(op)

    def _template_or_404(self, template_id: str) -> dict[str, Any]:
        row = self._store.get_template(template_id)
        if row is None:
            raise _not_found(f"Job template {template_id} cannot be found.")
        return row

    def describe_job_template(self, template_id: str) -> dict[str, Any]:
        self._check_template_id(template_id)

        def op(_: _Tracker, __: int) -> dict[str, Any]:
            row = self._template_or_404(template_id)
            body = row["body"]
            out: dict[str, Any] = {"jobTemplateArn": self.template_arn(template_id),
                                   "jobTemplateId": template_id,
                                   "description": body["description"]}
            for name in ("documentSource", "document"):
                if name in body:
                    out[name] = body[name]
            out["createdAt"] = row["createdAt"]
            for name in CONFIGS + ("maintenanceWindows",):
                if name in body:
                    out[name] = body[name]
            return out
        return self._run(op)

    def list_job_templates(self, max_results: Optional[int],
                           token: Optional[str]) -> dict[str, Any]:
        def op(_: _Tracker, __: int) -> dict[str, Any]:
            rows = [{"jobTemplateArn": self.template_arn(r["templateId"]),
                     "jobTemplateId": r["templateId"], "description": r["body"]["description"],
                     "createdAt": r["createdAt"]} for r in self._store.list_templates()]
            return _page(rows, "jobTemplates", max_results, token)
        return self._run(op)

    def delete_job_template(self, template_id: str) -> None:
        self._check_template_id(template_id)

        def op(_: _Tracker, __: int) -> None:
            if not self._store.delete_template(template_id):
                raise _not_found(f"Job template {template_id} cannot be found.")
        self._run(op)

    # -- AWS managed templates -----------------------------------------------------------------
    @staticmethod
    def _check_managed_name(name: str) -> None:
        if not 1 <= len(name) <= MAX_MANAGED_NAME:
            raise _invalid(f"templateName must be 1..{MAX_MANAGED_NAME} characters")

    def list_managed_job_templates(self, name: Optional[str], max_results: Optional[int],
                                   token: Optional[str]) -> dict[str, Any]:
        if name is not None:
            self._check_managed_name(name)
        found = managed.versions_of(name)
        if name is not None and not found:
            raise _not_found(f"Managed job template {name} cannot be found.")
        return _page([t.summary(self.region) for t in found], "managedJobTemplates",
                     max_results, token)

    def describe_managed_job_template(self, name: str,
                                      version: Optional[str]) -> dict[str, Any]:
        self._check_managed_name(name)
        if version is not None and not _VERSION.match(version):
            raise _invalid("templateVersion must match ^[1-9]+.[0-9]+ (e.g. 1.0)")
        template = managed.find(name, version)
        if template is None:
            raise _not_found(f"Managed job template {name}"
                             + (f" version {version}" if version else "") + " cannot be found.")
        return template.view(self.region)

    # -- CreateJob from a template -------------------------------------------------------------
    def _resolve_template(self, body: dict[str, Any]) -> tuple[dict[str, Any], Optional[str]]:
        """CreateJob's body with the template's document and configs filled in where the body
        has none, and the document before substitution (None without a managed template)."""
        arn, parameters = body.get("jobTemplateArn"), body.get("documentParameters")
        if arn is None:
            if parameters is not None:
                raise _invalid("documentParameters can only be used with an AWS managed job"
                               " template (jobTemplateArn)")
            return body, None
        if not isinstance(arn, str) or not 1 <= len(arn) <= MAX_ARN or not _ARN.fullmatch(arn):
            raise _invalid(f"jobTemplateArn must match ^arn:[!-~]+$, 1..{MAX_ARN} characters")
        m = _TEMPLATE_ARN.fullmatch(arn)
        if m is None:
            raise _invalid(f"jobTemplateArn {arn} is not a job template ARN")
        if body.get("document") is not None or body.get("documentSource") is not None:
            raise _invalid("A job from a template takes its document from the template: send"
                           " jobTemplateArn without document or documentSource")
        region, account, resource = m.groups()
        if account == "":
            return self._from_managed(arn, region, resource, body, parameters)
        if parameters is not None:
            raise _invalid("documentParameters can only be used with an AWS managed job template,"
                           " not with a custom one")
        if not _TEMPLATE_ID.fullmatch(resource):
            raise _invalid(f"jobTemplateArn {arn} names no valid job template id")
        if (region, account) != (self.region, self.account):
            raise _not_found(f"Job template {arn} does not exist in {self.region}/{self.account}")
        row = self._run(lambda _t, _n: self._store.get_template(resource))
        if row is None:
            raise _not_found(f"Job template {resource} cannot be found.")
        template = row["body"]
        out = dict(body)
        for name in ("document", "documentSource"):
            if name in template:
                out[name] = template[name]
        for name in CONFIGS:
            if out.get(name) is None and name in template:
                out[name] = template[name]
        windows = template.get("maintenanceWindows")
        if windows:
            scheduling = out.get("schedulingConfig")
            if scheduling is None:
                out["schedulingConfig"] = {"maintenanceWindows": windows}
            elif isinstance(scheduling, dict) and scheduling.get("maintenanceWindows") is None:
                out["schedulingConfig"] = {**scheduling, "maintenanceWindows": windows}
        if out.get("description") is None:
            out["description"] = template["description"]
        return out, None

    def _from_managed(self, arn: str, region: str, resource: str, body: dict[str, Any],
                      parameters: Any) -> tuple[dict[str, Any], str]:
        name, colon, version = resource.rpartition(":")
        if not colon or not name:
            raise _invalid(f"jobTemplateArn {arn}: a managed template ARN ends with"
                           " /<name>:<version>")
        template = managed.find(name, version) if region == self.region else None
        if template is None:
            raise _not_found(f"Managed job template {name} version {version} cannot be found"
                             f" in {self.region}.")
        values = self._parameter_values(template, parameters)
        out = dict(body)
        out["document"] = substitute(template.document, values)
        if out.get("description") is None:
            out["description"] = template.description
        return out, template.document

    @staticmethod
    def _parameter_values(template: managed.ManagedTemplate, given: Any) -> dict[str, str]:
        """Every parameter of the template: the given value, "" for an omitted optional one."""
        if given is None:
            given = {}
        if not isinstance(given, dict):
            raise _invalid("documentParameters must map parameter names to strings")
        declared = {p.key: p for p in template.parameters}
        label = f"{template.name}:{template.version}"
        for key, value in given.items():
            if not _PARAMETER_KEY.fullmatch(key):
                raise _invalid(f"documentParameters key {key!r} must match [a-zA-Z0-9_-]{{1,128}}")
            if key not in declared:
                raise _invalid(f"{label} has no parameter {key}; it takes "
                               + ", ".join(declared))
            if (not isinstance(value, str) or not 1 <= len(value) <= MAX_PARAMETER_VALUE
                    or _has_control(value)):
                raise _invalid(f"documentParameters.{key} must be 1..{MAX_PARAMETER_VALUE}"
                               " characters without control characters")
            if not re.fullmatch(declared[key].regex, value):
                raise _invalid(f"documentParameters.{key} does not match"
                               f" {declared[key].regex}")
        missing = [p.key for p in template.parameters if not p.optional and p.key not in given]
        if missing:
            raise _invalid(f"{label} needs documentParameters {', '.join(missing)}")
        return {p.key: given.get(p.key, "") for p in template.parameters}


def add_routes(router: Any, service: Any) -> None:
    """The control-plane operations of this part (control.py calls it)."""
    def create(req: Any) -> dict[str, Any]:
        return service.create_job_template(req.labels["jobTemplateId"], req.body)

    def describe(req: Any) -> dict[str, Any]:
        return service.describe_job_template(req.labels["jobTemplateId"])

    def list_(req: Any) -> dict[str, Any]:
        return service.list_job_templates(req.q_int("maxResults"), req.q_str("nextToken"))

    def delete(req: Any) -> None:
        service.delete_job_template(req.labels["jobTemplateId"])

    def list_managed(req: Any) -> dict[str, Any]:
        return service.list_managed_job_templates(req.q_str("templateName"),
                                                  req.q_int("maxResults"),
                                                  req.q_str("nextToken"))

    def describe_managed(req: Any) -> dict[str, Any]:
        return service.describe_managed_job_template(req.labels["templateName"],
                                                     req.q_str("templateVersion"))

    router.add("PUT", "/job-templates/{jobTemplateId}", create)
    router.add("GET", "/job-templates/{jobTemplateId}", describe)
    router.add("GET", "/job-templates", list_)
    router.add("DELETE", "/job-templates/{jobTemplateId}", delete)
    router.add("GET", "/managed-job-templates", list_managed)
    router.add("GET", "/managed-job-templates/{templateName}", describe_managed)
