"""Job templates in jobsd (FLEET.md 5; scenarios 20-23 of its section 9): custom templates,
the AWS managed catalog, CreateJob from either with `documentParameters`, the validation errors,
and our device running jobs built from AWS-Reboot and AWS-Download-File end to end (devsim).

The control-plane tests share one jobsd per module and work on fresh names; the tests that
list custom templates or drive a device have their own jobsd. No sleeps: waits poll with a
deadline."""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from conftest import thing_arn, wait_execution

REGION, ACCOUNT = "us-east-1", "123456789012"
JOBSD_FILES = "module_files"  # conftest's module_jobsd runs with this fixture's folder
MANAGED = f"arn:aws:iot:{REGION}::jobtemplate"
PLACEHOLDER = "${aws:iot:parameter:"
CATALOG = {  # FLEET.md 5.2: action name, type, handler, required keys, optional keys
    "AWS-Reboot": ("Reboot", "runHandler", "reboot.sh", [], ["runAsUser", "pathToHandler"]),
    "AWS-Download-File": ("Download-File", "runHandler", "download-file.sh",
                          ["downloadUrl", "filePath"], ["runAsUser", "pathToHandler"]),
    "AWS-Install-Application": ("Install-Application", "runHandler", "install-packages.sh",
                                ["packages"], ["runAsUser", "pathToHandler"]),
    "AWS-Remove-Application": ("Remove-Application", "runHandler", "remove-packages.sh",
                               ["packages"], ["runAsUser", "pathToHandler"]),
    "AWS-Start-Application": ("Start-Application", "runHandler", "start-services.sh",
                              ["services"], ["runAsUser", "pathToHandler"]),
    "AWS-Stop-Application": ("Stop-Application", "runHandler", "stop-services.sh",
                             ["services"], ["runAsUser", "pathToHandler"]),
    "AWS-Restart-Application": ("Restart-Application", "runHandler", "restart-services.sh",
                                ["services"], ["runAsUser", "pathToHandler"]),
    "AWS-Run-Command": ("Run-Command", "runCommand", None, ["command"], ["runAsUser"]),
}
DOWNLOAD = f"{MANAGED}/AWS-Download-File:1.0"
REBOOT = f"{MANAGED}/AWS-Reboot:1.0"
FOUR_CONFIGS = {
    "timeoutConfig": {"inProgressTimeoutInMinutes": 30},
    "presignedUrlConfig": {"expiresInSec": 600},
    "jobExecutionsRolloutConfig": {"maximumPerMinute": 50},
    "abortConfig": {"criteriaList": [{"failureType": "FAILED", "action": "CANCEL",
                                      "thresholdPercentage": 50.0,
                                      "minNumberOfExecutedThings": 5}]},
}


@pytest.fixture(scope="module")
def module_files(tmp_path_factory):
    return tmp_path_factory.mktemp("files")


@pytest.fixture
def ops(module_jobsd):
    """boto3 `iot` of the module's jobsd."""
    return module_jobsd.iot


@pytest.fixture
def raw(module_jobsd):
    """The same without boto3's own checks (required members, `min` bounds), so that jobsd's
    answer to what boto3 would refuse is seen."""
    return boto3.client("iot", endpoint_url=module_jobsd.control_url, region_name=REGION,
                        aws_access_key_id="local", aws_secret_access_key="local",
                        config=Config(retries={"max_attempts": 1}, parameter_validation=False))


@pytest.fixture
def name():
    """A fresh name prefix for things, jobs and templates on the shared jobsd."""
    return "t" + uuid.uuid4().hex[:10]


def error(call, **kwargs) -> tuple[str, int, str]:
    with pytest.raises(ClientError) as e:
        call(**kwargs)
    err = e.value.response
    return (err["Error"]["Code"], err["ResponseMetadata"]["HTTPStatusCode"],
            err["Error"].get("Message", ""))


def template_arn(template_id: str) -> str:
    return f"arn:aws:iot:{REGION}:{ACCOUNT}:jobtemplate/{template_id}"


def assert_no_job(iot, job_id: str) -> None:
    assert error(iot.describe_job, jobId=job_id)[:2] == ("ResourceNotFoundException", 404)


def assert_no_template(iot, template_id: str) -> None:
    assert error(iot.describe_job_template,
                 jobTemplateId=template_id)[:2] == ("ResourceNotFoundException", 404)


def new_thing(iot, thing: str) -> str:
    iot.create_thing(thingName=thing)
    return thing_arn(thing)


def action_of(document: str) -> dict:
    doc = json.loads(document)
    assert doc["version"] == "1.0" and len(doc["steps"]) == 1, doc
    return doc["steps"][0]["action"]


# -- scenario 20: a job from a managed template ----------------------------------------------

def test_managed_template_substitutes_parameters(ops, name):
    target = new_thing(ops, name)
    template = ops.describe_managed_job_template(templateName="AWS-Download-File")
    params = {"downloadUrl": "https://example.com/fw.bin", "filePath": "dl/fw.bin"}
    out = ops.create_job(jobId=name, targets=[target], jobTemplateArn=DOWNLOAD,
                         documentParameters=params)
    # no description given: the template's
    assert out["description"] == template["description"] == \
        "A managed job template for downloading a file."

    resolved = ops.get_job_document(jobId=name)["document"]
    assert PLACEHOLDER not in resolved
    action = action_of(resolved)
    assert action["name"] == "Download-File" and action["type"] == "runHandler"
    assert action["input"]["handler"] == "download-file.sh"
    assert action["input"]["args"] == ["https://example.com/fw.bin", "dl/fw.bin"]
    assert action["input"]["path"] == "" and action["runAsUser"] == ""  # optionals omitted

    before = ops.get_job_document(jobId=name, beforeSubstitution=True)["document"]
    assert before == template["document"]
    assert "${aws:iot:parameter:downloadUrl}" in before
    assert "${aws:iot:parameter:runAsUser}" in before
    assert ops.get_job_document(jobId=name, beforeSubstitution=False)["document"] == resolved

    job = ops.describe_job(jobId=name)["job"]
    assert job["jobTemplateArn"] == DOWNLOAD
    assert job["documentParameters"] == params
    assert job["description"] == template["description"]

    # what a device receives is the resolved document
    ex = ops.describe_job_execution(jobId=name, thingName=name)["execution"]
    assert ex["status"] == "QUEUED"

    # a required parameter missing: nothing created
    code, status, message = error(ops.create_job, jobId=name + "-x", targets=[target],
                                  jobTemplateArn=DOWNLOAD,
                                  documentParameters={"downloadUrl": "https://example.com/a"})
    assert (code, status) == ("InvalidRequestException", 400) and "filePath" in message
    assert_no_job(ops, name + "-x")


def test_managed_template_values_are_json_escaped_and_optionals_used(ops, name):
    target = new_thing(ops, name)
    tricky = 'https://example.com/a "quoted" \\ back/slash ü ${aws:iot:parameter:filePath}'
    ops.create_job(jobId=name, targets=[target], jobTemplateArn=DOWNLOAD,
                   description="mine wins",
                   documentParameters={"downloadUrl": tricky, "filePath": "x.bin",
                                       "runAsUser": "root", "pathToHandler": "/opt/handlers"})
    action = action_of(ops.get_job_document(jobId=name)["document"])
    # the value arrives as it was sent: escaped inside the JSON string, not substituted again
    assert action["input"]["args"] == [tricky, "x.bin"]
    assert action["runAsUser"] == "root" and action["input"]["path"] == "/opt/handlers"
    assert ops.describe_job(jobId=name)["job"]["description"] == "mine wins"


def test_managed_template_without_parameters(ops, name):
    """AWS-Reboot takes no required parameter: documentParameters may be left out."""
    target = new_thing(ops, name)
    out = ops.create_job(jobId=name, targets=[target], jobTemplateArn=REBOOT)
    assert out["description"] == "A managed job template for rebooting the device."
    action = action_of(ops.get_job_document(jobId=name)["document"])
    assert action == {"name": "Reboot", "type": "runHandler",
                      "input": {"handler": "reboot.sh", "path": ""}, "runAsUser": ""}
    job = ops.describe_job(jobId=name)["job"]
    assert job["jobTemplateArn"] == REBOOT and "documentParameters" not in job


@pytest.mark.parametrize("arn,params,code,words", [
    (DOWNLOAD, {"downloadUrl": "u", "filePath": "p", "size": "1"}, "InvalidRequestException",
     "no parameter size"),
    (DOWNLOAD, {"filePath": "p"}, "InvalidRequestException", "downloadUrl"),
    (DOWNLOAD, {"downloadUrl": "u", "filePath": "p", "runAsUser": "r" * 257},
     "InvalidRequestException", "does not match"),
    (DOWNLOAD, {"downloadUrl": "u", "filePath": "p", "runAsUser": ""},
     "InvalidRequestException", "runAsUser"),
    (DOWNLOAD, {"downloadUrl": "a\nb", "filePath": "p"}, "InvalidRequestException",
     "control characters"),
    (DOWNLOAD, {"downloadUrl": "u", "filePath": "p", "bad key": "v"}, "InvalidRequestException",
     "must match"),
    # each value within its 30720 limit, the document past 32768 characters
    (DOWNLOAD, {"downloadUrl": "u" * 30720, "filePath": "p" * 3000}, "InvalidRequestException",
     "32768"),
    (f"{MANAGED}/AWS-Download-File:2.0", {"downloadUrl": "u", "filePath": "p"},
     "ResourceNotFoundException", "cannot be found"),
    (f"{MANAGED}/AWS-No-Such:1.0", None, "ResourceNotFoundException", "cannot be found"),
    ("arn:aws:iot:eu-west-1::jobtemplate/AWS-Reboot:1.0", None, "ResourceNotFoundException",
     "cannot be found"),
    (f"{MANAGED}/AWS-Reboot", None, "InvalidRequestException", "<version>"),
    (f"arn:aws:iot:{REGION}:{ACCOUNT}:jobtemplate/no-such-template", None,
     "ResourceNotFoundException", "cannot be found"),
    (f"arn:aws:iot:{REGION}:{ACCOUNT}:job/not-a-template", None, "InvalidRequestException",
     "not a job template ARN"),
    ("arn:aws:iot:with space", None, "InvalidRequestException", "arn:"),
])
def test_create_job_from_template_errors(raw, name, arn, params, code, words):
    target = new_thing(raw, name)
    kwargs = {"jobId": name, "targets": [target], "jobTemplateArn": arn}
    if params is not None:
        kwargs["documentParameters"] = params
    got_code, status, message = error(raw.create_job, **kwargs)
    assert got_code == code, message
    assert status == (400 if code == "InvalidRequestException" else 404)
    assert words in message, message
    assert_no_job(raw, name)


# -- scenario 21: documentParameters misuse ----------------------------------------------------

def test_document_parameters_only_with_a_managed_template(ops, name):
    target = new_thing(ops, name)
    ops.create_job_template(jobTemplateId=name, description="custom",
                            document=json.dumps({"operation": "demo"}))
    misuse = [
        {"document": json.dumps({"operation": "demo"}), "documentParameters": {"a": "b"}},
        {"jobTemplateArn": template_arn(name), "documentParameters": {"a": "b"}},
        {"jobTemplateArn": REBOOT, "document": json.dumps({"operation": "reboot"})},
        {"jobTemplateArn": template_arn(name), "document": json.dumps({"operation": "demo"})},
        {"jobTemplateArn": template_arn(name),
         "documentSource": "https://s3.amazonaws.com/docs/demo.json"},
    ]
    for i, extra in enumerate(misuse):
        code, status, message = error(ops.create_job, jobId=f"{name}-{i}", targets=[target],
                                      **extra)
        assert (code, status) == ("InvalidRequestException", 400), (extra, message)
        assert_no_job(ops, f"{name}-{i}")
    assert "managed" in error(ops.create_job, jobId=name, targets=[target],
                              **misuse[1])[2]


# -- scenario 22: custom templates -------------------------------------------------------------

def test_custom_template_lifecycle(iot):
    target = new_thing(iot, "dev1")
    document = json.dumps({"operation": "demo", "steps": 2})
    before = time.time()
    out = iot.create_job_template(jobTemplateId="t1", description="demo template",
                                  document=document, **FOUR_CONFIGS)
    assert out["jobTemplateArn"] == template_arn("t1") and out["jobTemplateId"] == "t1"

    described = iot.describe_job_template(jobTemplateId="t1")
    assert described["jobTemplateArn"] == template_arn("t1")
    assert described["description"] == "demo template" and described["document"] == document
    assert before - 5 <= described["createdAt"].timestamp() <= time.time() + 5
    for key, value in FOUR_CONFIGS.items():
        assert described[key] == value, key
    assert "jobExecutionsRetryConfig" not in described and "documentSource" not in described

    code, status, message = error(iot.create_job_template, jobTemplateId="t1",
                                  description="again", document=document)
    assert (code, status) == ("ConflictException", 409), message
    assert iot.describe_job_template(jobTemplateId="t1")["description"] == "demo template"

    listed = iot.list_job_templates()["jobTemplates"]
    assert [t["jobTemplateId"] for t in listed] == ["t1"]  # custom ones only, no AWS-*
    assert listed[0]["jobTemplateArn"] == template_arn("t1")
    assert listed[0]["description"] == "demo template"
    assert listed[0]["createdAt"] == described["createdAt"]

    # a job from t1: its document, configs and description
    out = iot.create_job(jobId="j1", targets=[target], jobTemplateArn=template_arn("t1"))
    assert out["description"] == "demo template"
    job = iot.describe_job(jobId="j1")["job"]
    assert job["jobTemplateArn"] == template_arn("t1")
    for key, value in FOUR_CONFIGS.items():
        assert job[key] == value, key
    assert iot.get_job_document(jobId="j1")["document"] == document

    # CreateJob's own config wins over the template's
    iot.create_job(jobId="j2", targets=[target], jobTemplateArn=template_arn("t1"),
                   description="own", timeoutConfig={"inProgressTimeoutInMinutes": 5})
    job2 = iot.describe_job(jobId="j2")["job"]
    assert job2["timeoutConfig"] == {"inProgressTimeoutInMinutes": 5}
    assert job2["description"] == "own"
    for key in ("presignedUrlConfig", "jobExecutionsRolloutConfig", "abortConfig"):
        assert job2[key] == FOUR_CONFIGS[key], key

    # a template from that job copies its document and configs
    iot.create_job_template(jobTemplateId="t2", description="from j2",
                            jobArn=job2["jobArn"])
    t2 = iot.describe_job_template(jobTemplateId="t2")
    assert t2["document"] == document and t2["description"] == "from j2"
    assert t2["timeoutConfig"] == {"inProgressTimeoutInMinutes": 5}
    for key in ("presignedUrlConfig", "jobExecutionsRolloutConfig", "abortConfig"):
        assert t2[key] == FOUR_CONFIGS[key], key
    # ... and the request's own configs win over the job's
    iot.create_job_template(jobTemplateId="t3", description="from j1, shorter URLs",
                            jobArn=job["jobArn"], presignedUrlConfig={"expiresInSec": 120})
    t3 = iot.describe_job_template(jobTemplateId="t3")
    assert t3["presignedUrlConfig"] == {"expiresInSec": 120}
    assert t3["timeoutConfig"] == FOUR_CONFIGS["timeoutConfig"]

    # pages in creation order
    first = iot.list_job_templates(maxResults=2)
    assert [t["jobTemplateId"] for t in first["jobTemplates"]] == ["t1", "t2"]
    rest = iot.list_job_templates(maxResults=2, nextToken=first["nextToken"])
    assert [t["jobTemplateId"] for t in rest["jobTemplates"]] == ["t3"]
    assert "nextToken" not in rest

    iot.delete_job_template(jobTemplateId="t1")
    assert_no_template(iot, "t1")
    assert error(iot.delete_job_template,
                 jobTemplateId="t1")[:2] == ("ResourceNotFoundException", 404)
    assert error(iot.create_job, jobId="j3", targets=[target],
                 jobTemplateArn=template_arn("t1"))[:2] == ("ResourceNotFoundException", 404)
    assert_no_job(iot, "j3")
    # jobs made from it live on
    assert iot.describe_job(jobId="j1")["job"]["jobTemplateArn"] == template_arn("t1")
    assert [t["jobTemplateId"] for t in iot.list_job_templates()["jobTemplates"]] == ["t2", "t3"]


def test_custom_template_maintenance_windows_and_document_source(ops, name, module_files):
    doc = {"operation": "demo", "from": "s3"}
    (module_files / "docs").mkdir(exist_ok=True)
    (module_files / "docs" / f"{name}.json").write_text(json.dumps(doc))
    source = f"https://s3.amazonaws.com/docs/{name}.json"
    windows = [{"startTime": "cron(0 3 * * ? *)", "durationInMinutes": 60}]
    retry = {"criteriaList": [{"failureType": "FAILED", "numberOfRetries": 2}]}
    ops.create_job_template(jobTemplateId=name, description="from S3", documentSource=source,
                            maintenanceWindows=windows, jobExecutionsRetryConfig=retry,
                            tags=[{"Key": "team", "Value": "fw"}])
    described = ops.describe_job_template(jobTemplateId=name)
    assert described["documentSource"] == source and "document" not in described
    assert described["maintenanceWindows"] == windows
    assert described["jobExecutionsRetryConfig"] == retry
    target = new_thing(ops, name)
    ops.create_job(jobId=name, targets=[target], jobTemplateArn=template_arn(name))
    assert json.loads(ops.get_job_document(jobId=name)["document"]) == doc
    job = ops.describe_job(jobId=name)["job"]
    assert job["schedulingConfig"]["maintenanceWindows"] == windows
    assert job["jobExecutionsRetryConfig"] == retry
    assert job["description"] == "from S3"


# -- scenario 23: the managed catalog ----------------------------------------------------------

def test_managed_catalog(ops):
    listed = ops.list_managed_job_templates()["managedJobTemplates"]
    assert sorted(t["templateName"] for t in listed) == sorted(CATALOG)
    for t in listed:
        assert t["templateVersion"] == "1.0" and t["environments"] == ["LINUX"]
        assert t["templateArn"] == f"{MANAGED}/{t['templateName']}:1.0"
        assert t["templateArn"].split(":")[4] == ""  # no account
        assert t["description"].startswith("A managed job template for ")
    assert {t["templateName"]: t["description"] for t in listed}["AWS-Remove-Application"] == \
        "A managed job template for uninstalling one or more applications."

    only = ops.list_managed_job_templates(templateName="AWS-Reboot")["managedJobTemplates"]
    assert [t["templateName"] for t in only] == ["AWS-Reboot"]

    for tname, (action_name, kind, handler, required, optional) in CATALOG.items():
        d = ops.describe_managed_job_template(templateName=tname)
        assert d["templateName"] == tname and d["templateVersion"] == "1.0"
        assert d["templateArn"] == f"{MANAGED}/{tname}:1.0"
        assert d["environments"] == ["LINUX"]
        params = {p["key"]: p for p in d["documentParameters"]}
        assert [k for k, p in params.items() if not p["optional"]] == required, tname
        assert [k for k, p in params.items() if p["optional"]] == optional, tname
        for p in params.values():
            assert p["description"] and p["example"] and p["regex"]
            re.compile(p["regex"])
            assert re.fullmatch(p["regex"], p["example"]), (tname, p)
        # every placeholder is a declared parameter and every parameter has its placeholder
        keys = set(re.findall(r"\$\{aws:iot:parameter:([^}]+)\}", d["document"]))
        assert keys == set(params), tname
        action = action_of(d["document"])
        assert action["name"] == action_name and action["type"] == kind
        assert action["runAsUser"] == "${aws:iot:parameter:runAsUser}"
        if handler is None:
            assert action["input"] == {"command": "${aws:iot:parameter:command}"}
        else:
            assert action["input"]["handler"] == handler
            assert action["input"]["path"] == "${aws:iot:parameter:pathToHandler}"
            assert action["input"].get("args", []) == ["${aws:iot:parameter:%s}" % k
                                                        for k in required]
        assert ops.describe_managed_job_template(templateName=tname,
                                                 templateVersion="1.0")["document"] == d["document"]
    download = ops.describe_managed_job_template(templateName="AWS-Download-File")
    regexes = {p["key"]: p["regex"] for p in download["documentParameters"]}
    assert regexes == {"downloadUrl": "(.*?)", "filePath": "(.*?)", "runAsUser": "(.){0,256}",
                       "pathToHandler": "(.){0,4096}"}

    first = ops.list_managed_job_templates(maxResults=3)
    assert len(first["managedJobTemplates"]) == 3 and first["nextToken"]
    names = [t["templateName"] for t in first["managedJobTemplates"]]
    token = first["nextToken"]
    while token:
        page = ops.list_managed_job_templates(maxResults=3, nextToken=token)
        names += [t["templateName"] for t in page["managedJobTemplates"]]
        token = page.get("nextToken")
    assert names == [t["templateName"] for t in listed]


@pytest.mark.parametrize("call,kwargs,code", [
    ("describe_managed_job_template", {"templateName": "AWS-No-Such"},
     "ResourceNotFoundException"),
    ("describe_managed_job_template", {"templateName": "AWS-Reboot", "templateVersion": "2.0"},
     "ResourceNotFoundException"),
    ("describe_managed_job_template", {"templateName": "AWS-Reboot", "templateVersion": "x"},
     "InvalidRequestException"),
    ("describe_managed_job_template", {"templateName": "A" * 65}, "InvalidRequestException"),
    ("list_managed_job_templates", {"templateName": "AWS-No-Such"}, "ResourceNotFoundException"),
    ("list_managed_job_templates", {"maxResults": 251}, "InvalidRequestException"),
    ("list_managed_job_templates", {"maxResults": 0}, "InvalidRequestException"),
    ("list_job_templates", {"maxResults": 251}, "InvalidRequestException"),
    ("list_job_templates", {"nextToken": "garbage"}, "InvalidRequestException"),
])
def test_catalog_and_listing_errors(raw, call, kwargs, code):
    got, status, message = error(getattr(raw, call), **kwargs)
    assert got == code, message
    assert status == (400 if code == "InvalidRequestException" else 404)


# -- CreateJobTemplate validation --------------------------------------------------------------

DOC = json.dumps({"operation": "demo"})


@pytest.mark.parametrize("template_id,kwargs,words", [
    ("x" * 65, {"description": "d", "document": DOC}, "jobTemplateId"),
    ("bad.id", {"description": "d", "document": DOC}, "jobTemplateId"),
    (None, {"document": DOC}, "description is required"),
    (None, {"description": "", "document": DOC}, "description"),
    (None, {"description": "d" * 2029, "document": DOC}, "2028"),
    (None, {"description": "bell\x07", "document": DOC}, "control"),
    (None, {"description": "d"}, "exactly one of"),
    (None, {"description": "d", "document": DOC,
            "documentSource": "https://s3.amazonaws.com/docs/x.json"}, "exactly one of"),
    (None, {"description": "d", "document": DOC, "jobArn": "arn:aws:iot:x"}, "exactly one of"),
    (None, {"description": "d", "document": "{" + '"a":"' + "x" * 32762 + '"}'}, "32768"),
    (None, {"description": "d", "document": "not json"}, "JSON"),
    (None, {"description": "d", "document": "[1]"}, "JSON object"),
    (None, {"description": "d", "documentSource": "https://s3.amazonaws.com/docs/none.json"},
     "does not exist"),
    (None, {"description": "d", "documentSource": "ftp://elsewhere/x.json"}, "S3"),
    (None, {"description": "d", "jobArn": "arn:aws:iot:us-east-1:123456789012:thing/x"},
     "job ARN"),
    (None, {"description": "d", "document": DOC,
            "timeoutConfig": {"inProgressTimeoutInMinutes": 10081}}, "10080"),
    (None, {"description": "d", "document": DOC, "presignedUrlConfig": {"expiresInSec": 59}},
     "expiresInSec"),
    (None, {"description": "d", "document": DOC, "abortConfig": {"criteriaList": []}},
     "criteriaList"),
    (None, {"description": "d", "document": DOC,
            "jobExecutionsRetryConfig": {"criteriaList": [{}, {}, {}]}}, "criteriaList"),
    (None, {"description": "d", "document": DOC,
            "jobExecutionsRolloutConfig": {"maximumPerMinute": 0}}, "maximumPerMinute"),
    (None, {"description": "d", "document": DOC,
            "maintenanceWindows": [{"startTime": "cron(0 3 * * ? *)",
                                    "durationInMinutes": 1431}]}, "1430"),
    (None, {"description": "d", "document": DOC,
            "maintenanceWindows": [{"durationInMinutes": 60}]}, "startTime"),
    (None, {"description": "d", "document": DOC, "tags": [{"Value": "v"}]}, "Key"),
    (None, {"description": "d", "document": DOC,
            "destinationPackageVersions": ["arn:aws:iot:us-east-1:123456789012:package/p/version/1"]},
     "destinationPackageVersions"),
])
def test_create_job_template_validation(raw, name, template_id, kwargs, words):
    template_id = template_id or name
    code, status, message = error(raw.create_job_template, jobTemplateId=template_id, **kwargs)
    assert (code, status) == ("InvalidRequestException", 400), message
    assert words in message, message
    if re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", template_id):
        assert_no_template(raw, template_id)


def test_create_job_template_limits_accepted(ops, name):
    """The largest description and document the model allows are accepted."""
    big = json.dumps({"operation": "demo", "pad": ""})
    big = big[:-2] + "x" * (32768 - len(big)) + '"}'
    assert len(big) == 32768
    ops.create_job_template(jobTemplateId=name, description="d" * 2028, document=big)
    d = ops.describe_job_template(jobTemplateId=name)
    assert d["document"] == big and len(d["description"]) == 2028
    longest = "x" * 64
    ops.create_job_template(jobTemplateId=longest, description="id of 64", document=DOC)
    assert ops.describe_job_template(jobTemplateId=longest)["jobTemplateId"] == longest


def test_template_from_a_job_that_is_not_there(ops, name):
    for arn, code in ((f"arn:aws:iot:{REGION}:{ACCOUNT}:job/{name}", "ResourceNotFoundException"),
                      (f"arn:aws:iot:{REGION}:999999999999:job/{name}",
                       "ResourceNotFoundException")):
        got, status, message = error(ops.create_job_template, jobTemplateId=name,
                                     description="d", jobArn=arn)
        assert (got, status) == (code, 404), message
    assert_no_template(ops, name)
    for call in (ops.describe_job_template, ops.delete_job_template):
        assert error(call, jobTemplateId=name)[:2] == ("ResourceNotFoundException", 404)
        assert error(call, jobTemplateId="bad.id")[:2] == ("InvalidRequestException", 400)


# -- our device runs jobs made from the managed templates (devsim) -----------------------------

TERMINAL = {"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED", "REMOVED"}
DEVICE_CONFIG = {"download": {"allow": ["http://127.0.0.1:"], "root": "data"},
                 "progress_min_ms": 0}


def wait_job(iot, job_id: str, statuses, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = iot.describe_job(jobId=job_id)["job"]
        if job["status"] in statuses or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


def test_device_runs_aws_reboot_from_the_template(jobsd, iot, device):
    thing = "rb-tpl"
    iot.create_thing(thingName=thing)
    iot.create_job(jobId="reboot", targets=[thing_arn(thing)], jobTemplateArn=REBOOT)
    dev = device(thing, config=DEVICE_CONFIG, heap="144K")
    ex = wait_execution(iot, "reboot", thing, TERMINAL, 40, device=dev)
    details = ex.get("statusDetails", {}).get("detailsMap", {})
    assert ex["status"] == "SUCCEEDED" and details.get("rebooted") == "yes", (ex, dev.log_text())
    assert len(dev.boots()) == 2, "the job resets the device exactly once"
    assert wait_job(iot, "reboot", {"COMPLETED"})["status"] == "COMPLETED"


def test_device_runs_aws_download_file_from_the_template(jobsd, iot, device, files):
    data = os.urandom(50_000) + b"\nfrom AWS-Download-File\n"
    (files / "fw" / "t").mkdir(parents=True)
    (files / "fw" / "t" / "blob.bin").write_bytes(data)
    thing = "dl-tpl"
    iot.create_thing(thingName=thing)
    url = "${aws:iot:s3-presigned-url:https://s3.amazonaws.com/fw/t/blob.bin}"
    iot.create_job(jobId="download", targets=[thing_arn(thing)], jobTemplateArn=DOWNLOAD,
                   documentParameters={"downloadUrl": url, "filePath": "got/blob.bin",
                                       "runAsUser": "root"},
                   presignedUrlConfig={"expiresInSec": 600})
    dev = device(thing, config=DEVICE_CONFIG, heap="144K")
    ex = wait_execution(iot, "download", thing, TERMINAL, 40, device=dev)
    assert ex["status"] == "SUCCEEDED", (ex, dev.log_text())
    placed = os.path.join(dev.flash, "data", "got", "blob.bin")
    with open(placed, "rb") as f:
        got = f.read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest() and got == data
    assert not os.path.exists(placed + ".part")
    assert wait_job(iot, "download", {"COMPLETED"})["status"] == "COMPLETED"
