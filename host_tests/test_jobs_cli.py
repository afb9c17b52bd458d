"""tools/jobs against a real jobsd, with real simulated devices doing the work."""
import json
import os
import subprocess

from conftest import ROOT

JOBS = os.path.join(ROOT, "tools", "jobs")


def jobs(jobsd, *args, timeout=60):
    return subprocess.run([JOBS, "--endpoint", jobsd.control_url, *args], capture_output=True,
                          text=True, timeout=timeout)


def doc_file(tmp_path, doc, name="doc.json"):
    p = tmp_path / name
    p.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return str(p)


def test_create_watch_describe_list(jobsd, iot, device, spy, tmp_path):
    things = ["cli-a", "cli-b"]
    devs = []
    for t in things:
        iot.create_thing(thingName=t)
        watch = spy(t)
        devs.append(device(t))
        watch.wait_for(lambda topic, p: topic.endswith("/start-next"), what="device ready")
    doc = doc_file(tmp_path, {"operation": "demo", "steps": 2})
    r = jobs(jobsd, "create", "cli-job", "--document", doc, "--thing", "cli-a", "--thing", "cli-b",
             "--description", "from the CLI")
    assert r.returncode == 0, r.stderr
    assert "created cli-job" in r.stdout and "2 target(s)" in r.stdout

    w = jobs(jobsd, "watch", "cli-job", "--interval", "0.1", "--timeout", "60")
    assert w.returncode == 0, w.stdout + w.stderr
    assert "all 2 execution(s) terminal: 2 succeeded" in w.stdout
    for t in things:
        assert any(t in line and "SUCCEEDED" in line and '"reason": "OK"' in line
                   for line in w.stdout.splitlines()), w.stdout

    d = jobs(jobsd, "describe", "cli-job")
    assert d.returncode == 0, d.stderr
    assert "job cli-job: COMPLETED" in d.stdout
    assert '"operation":"demo"' in d.stdout.replace(" ", "")
    assert all(f"{t}" in d.stdout for t in things)

    ls = jobs(jobsd, "list", "--status", "COMPLETED")
    assert ls.returncode == 0 and "cli-job" in ls.stdout


def test_watch_reports_failure_with_exit_1(jobsd, iot, device, spy, tmp_path):
    iot.create_thing(thingName="cli-fail")
    watch = spy("cli-fail")
    device("cli-fail")
    watch.wait_for(lambda topic, p: topic.endswith("/start-next"), what="device ready")
    doc = doc_file(tmp_path, {"operation": "demo", "steps": 0, "fail": "nope"})
    assert jobs(jobsd, "create", "cli-bad", "--document", doc, "--thing", "cli-fail").returncode == 0
    w = jobs(jobsd, "watch", "cli-bad", "--interval", "0.1", "--timeout", "60")
    assert w.returncode == 1, w.stdout + w.stderr
    assert "FAILED" in w.stdout and "HANDLER_ERROR" in w.stdout


def test_cancel_and_errors(jobsd, iot, tmp_path):
    iot.create_thing(thingName="cli-idle")  # no device: the execution stays QUEUED
    doc = doc_file(tmp_path, {"operation": "demo"})
    assert jobs(jobsd, "create", "cli-cancel", "--document", doc, "--thing", "cli-idle").returncode == 0
    c = jobs(jobsd, "cancel", "cli-cancel", "--reason", "NOT_NEEDED", "--comment", "test")
    assert c.returncode == 0, c.stderr
    ex = iot.describe_job_execution(jobId="cli-cancel", thingName="cli-idle")["execution"]
    assert ex["status"] == "CANCELED"
    assert iot.describe_job(jobId="cli-cancel")["job"]["status"] == "CANCELED"

    bad = jobs(jobsd, "create", "cli-x", "--document", doc_file(tmp_path, "[1]", "list.json"),
               "--thing", "cli-idle")
    assert bad.returncode == 2 and "JSON object" in bad.stderr
    nothing = jobs(jobsd, "create", "cli-y", "--document", doc)
    assert nothing.returncode == 2 and "--thing or --group" in nothing.stderr
    missing = jobs(jobsd, "create", "cli-z", "--document", doc, "--thing", "no-such-thing")
    assert missing.returncode == 2 and "ResourceNotFoundException" in missing.stderr
    dup = jobs(jobsd, "create", "cli-cancel", "--document", doc, "--thing", "cli-idle")
    assert dup.returncode == 2 and "ResourceAlreadyExists" in dup.stderr


def test_group_targets_and_continuous(jobsd, iot, tmp_path):
    iot.create_thing_group(thingGroupName="kitchen")
    iot.create_thing(thingName="toaster")
    iot.add_thing_to_thing_group(thingGroupName="kitchen", thingName="toaster")
    doc = doc_file(tmp_path, {"operation": "demo"})
    r = jobs(jobsd, "create", "cli-group", "--document", doc, "--group", "kitchen", "--continuous")
    assert r.returncode == 0, r.stderr
    assert iot.describe_job(jobId="cli-group")["job"]["targetSelection"] == "CONTINUOUS"
    # a thing that joins the group later gets the job too
    iot.create_thing(thingName="kettle")
    iot.add_thing_to_thing_group(thingGroupName="kitchen", thingName="kettle")
    d = jobs(jobsd, "describe", "cli-group")
    assert d.returncode == 0, d.stderr
    assert "toaster" in d.stdout and "kettle" in d.stdout and "QUEUED" in d.stdout
    missing = jobs(jobsd, "create", "cli-nogroup", "--document", doc, "--group", "no-such-group")
    assert missing.returncode == 2 and "ResourceNotFoundException" in missing.stderr


def test_command_runs_on_a_device(jobsd, iot, device, spy, tmp_path):
    """tools/jobs command: creates the command when new, starts it, waits, prints the outcome."""
    iot.create_thing(thingName="cli-cmd")
    watch = spy("cli-cmd")
    dev = device("cli-cmd")
    watch.wait_for(lambda topic, p: topic.endswith("/start-next"), what="device ready")
    watch.wait_for(lambda topic, p: topic.endswith("/start-next/accepted"), what="device online")

    def command(*args):
        return subprocess.run([JOBS, "--endpoint", jobsd.control_url, "--data-endpoint",
                               jobsd.data_url, "command", *args], capture_output=True, text=True,
                              timeout=60)

    r = command("ping", "--thing", "cli-cmd")
    assert r.returncode == 0, r.stdout + r.stderr + dev.log_text()
    assert "started ping on cli-cmd" in r.stdout and "SUCCEEDED" in r.stdout
    assert '"pong": true' in r.stdout
    r = command("nope", "--thing", "cli-cmd", "--payload", '{"command": "nope"}')
    assert r.returncode == 1 and "REJECTED UNKNOWN_COMMAND" in r.stdout, r.stdout + r.stderr
    r = command("ping", "--thing", "cli-cmd", "--payload", '{"command": "ping", "x": 1}')
    assert r.returncode == 2 and "exists with another payload" in r.stderr
    r = command("bad", "--thing", "cli-cmd", "--payload", "[1]")
    assert r.returncode == 2 and "JSON object" in r.stderr


def test_ota_and_download_over_mqtt_make_a_stream_and_point_the_job_at_it(jobsd, iot, files,
                                                                          tmp_path):
    """`tools/jobs ota|download --protocol mqtt`: the file lands in jobsd's files folder, a
    stream named after the job serves it, and the document names the stream instead of a URL
    (both: the stream and the URL). The stream describes the file at its size."""
    import hashlib

    from iotjobs_host import sign

    iot.create_thing(thingName="cli-mqtt")
    keys = tmp_path / "keys"
    sign.keygen(str(keys))
    image = tmp_path / "fw.bin"
    image.write_bytes(os.urandom(20_000))
    r = jobs(jobsd, "ota", "cli-ota-mqtt", "--image", str(image), "--key",
             str(keys / sign.KEY_FILE), "--files", str(files), "--version", "2.0.0",
             "--protocol", "mqtt", "--thing", "cli-mqtt")
    assert r.returncode == 0, r.stderr
    doc = json.loads(iot.get_job_document(jobId="cli-ota-mqtt")["document"])
    assert doc["stream"] == {"id": "cli-ota-mqtt", "fileId": 0} and "url" not in doc, doc
    assert doc["size"] == 20_000 and doc["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    info = iot.describe_stream(streamId="cli-ota-mqtt")["streamInfo"]
    assert info["files"] == [{"fileId": 0, "s3Location": {"bucket": "firmware", "key": "fw.bin"}}]
    assert (files / "firmware" / "fw.bin").read_bytes() == image.read_bytes()

    afr = jobs(jobsd, "ota", "cli-afr-both", "--image", str(image), "--key",
               str(keys / sign.KEY_FILE), "--files", str(files), "--afr-ota", "--protocol", "both",
               "--thing", "cli-mqtt")
    assert afr.returncode == 0, afr.stderr
    ota = json.loads(iot.get_job_document(jobId="cli-afr-both")["document"])["afr_ota"]
    assert ota["protocols"] == ["MQTT", "HTTP"] and ota["streamname"] == "cli-afr-both"
    assert ota["files"][0]["update_data_url"].startswith("${aws:iot:s3-presigned-url:")

    data = tmp_path / "table.csv"
    data.write_bytes(b"a,b\n1,2\n" * 500)
    d = jobs(jobsd, "download", "cli-dl-mqtt", "--file", str(data), "--path", "t/table.csv",
             "--files", str(files), "--protocol", "mqtt", "--thing", "cli-mqtt")
    assert d.returncode == 0, d.stderr
    doc = json.loads(iot.get_job_document(jobId="cli-dl-mqtt")["document"])
    assert doc == {"operation": "download-file", "path": "t/table.csv", "size": 4000,
                   "sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
                   "stream": {"id": "cli-dl-mqtt", "fileId": 0}}, doc
    plain = jobs(jobsd, "download", "cli-dl-http", "--file", str(data), "--path", "t/x.csv",
                 "--files", str(files), "--key-name", "x.csv", "--thing", "cli-mqtt")
    assert plain.returncode == 0, plain.stderr
    assert "stream" not in json.loads(iot.get_job_document(jobId="cli-dl-http")["document"])

    again = jobs(jobsd, "download", "cli-dl-mqtt", "--file", str(data), "--path", "t/table.csv",
                 "--files", str(files), "--protocol", "mqtt", "--thing", "cli-mqtt")
    assert again.returncode == 2 and "ResourceAlreadyExists" in again.stderr, again.stderr
    outside = jobs(jobsd, "download", "cli-dl-bad", "--file", str(data), "--path", "x",
                   "--files", str(files), "--key-name", "../escape", "--thing", "cli-mqtt")
    assert outside.returncode == 2, outside.stderr
    assert "cli-dl-bad" not in [j["jobId"] for j in iot.list_jobs()["jobs"]]
