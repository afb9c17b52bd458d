"""Each thing sees only its own topics: the ACL jobsd generates (`tools/jobsd --write-acl`) on
the mutual-TLS listener, identity = certificate CN. Checked with real TLS clients (paho).

"Nothing arrived" is proven by ordering, not by waiting: mosquitto handles one client's
packets in order and forwards them in order, so once a later, allowed message is seen, an
earlier forbidden one would have been seen before it."""
import json
import os
import queue
import ssl
import threading

import paho.mqtt.client as mqtt
import pytest

from conftest import thing_arn

TIMEOUT = 10


class TlsThing:
    def __init__(self, mosquitto, pki, thing):
        folder = pki.thing(thing)
        self.thing = thing
        self.inbox = queue.Queue()
        self.subacks = queue.Queue()
        connected = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=thing)
        self.c.tls_set(ca_certs=pki.ca_pem, certfile=os.path.join(folder, "cert.pem"),
                       keyfile=os.path.join(folder, "key.pem"), cert_reqs=ssl.CERT_REQUIRED)
        self.c.on_connect = lambda *a: connected.set()
        self.c.on_message = lambda c, u, m: self.inbox.put((m.topic, m.payload))
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put([int(rc.value) for rc in rcs])
        self.c.connect("localhost", mosquitto.tls_port)
        self.c.loop_start()
        assert connected.wait(TIMEOUT), f"{thing} did not connect over TLS"

    def subscribe(self, topic):
        self.c.subscribe(topic, qos=1)
        return self.subacks.get(timeout=TIMEOUT)[0]

    def publish(self, topic, payload):
        self.c.publish(topic, payload, qos=1).wait_for_publish(TIMEOUT)

    def next_message(self):
        return self.inbox.get(timeout=TIMEOUT)

    def close(self):
        self.c.disconnect()  # first, so the loop thread ends at once
        self.c.loop_stop()


@pytest.fixture
def pair(mosquitto, pki, iot):
    for name in ("thing-a", "thing-b"):
        iot.create_thing(thingName=name)
    a, b = TlsThing(mosquitto, pki, "thing-a"), TlsThing(mosquitto, pki, "thing-b")
    yield a, b
    a.close()
    b.close()


def jobs(thing, suffix):
    return f"$aws/things/{thing}/jobs/{suffix}"


def test_acl_file_is_generated_by_jobsd(mosquitto):
    with open(os.path.join(os.path.dirname(mosquitto.conf), "things.acl")) as f:
        acl = f.read()
    assert "pattern read $aws/things/%u/jobs/notify-next" in acl
    assert "pattern write $aws/things/%u/jobs/+/update" in acl
    assert "acl_file" in open(mosquitto.conf).read()


def test_a_thing_cannot_read_another_things_topics(pair, iot):
    a, b = pair
    assert b.subscribe(jobs("thing-b", "notify-next")) == 1  # granted QoS 1
    assert a.subscribe(jobs("thing-a", "notify-next")) == 1
    for topic in (jobs("thing-b", "notify-next"), jobs("thing-b", "+/update/+"),
                  "$aws/things/+/jobs/notify-next", "$aws/things/#", "#"):
        rc = a.subscribe(topic)
        # mosquitto refuses (0x80) or grants a filter that delivers nothing of thing-b's
        assert rc in (0x80, 1), (topic, rc)
    iot.create_job(jobId="for-b", targets=[thing_arn("thing-b")], document=json.dumps({"x": 1}))
    iot.create_job(jobId="for-a", targets=[thing_arn("thing-a")], document=json.dumps({"x": 2}))
    topic, payload = b.next_message()
    assert topic == jobs("thing-b", "notify-next") and b"for-b" in payload
    # jobsd published for-b's events before for-a's: everything a got up to its own
    # notify-next is everything it could have got of b's.
    seen = []
    while not seen or seen[-1] != jobs("thing-a", "notify-next"):
        seen.append(a.next_message()[0])
    assert all(t.startswith("$aws/things/thing-a/") for t in seen), seen


def test_a_thing_cannot_publish_on_another_things_topics(pair, iot, spy):
    a, _ = pair
    watch = spy("thing-b")
    own = spy("thing-a")
    iot.create_job(jobId="b-job", targets=[thing_arn("thing-b")], document=json.dumps({"x": 1}))
    a.publish(jobs("thing-b", "start-next"), b'{"clientToken": "stolen"}')
    a.publish(jobs("thing-b", "b-job/update"), b'{"status": "FAILED"}')
    a.publish(jobs("thing-a", "start-next/accepted"), b'{"clientToken": "forged"}')
    a.publish(jobs("thing-a", "get"), b'{"clientToken": "marker"}')
    own.wait_for(lambda t, p: t == jobs("thing-a", "get"), TIMEOUT, "thing-a's own request")
    assert jobs("thing-a", "start-next/accepted") not in own.topics()
    assert jobs("thing-b", "start-next") not in watch.topics()
    assert jobs("thing-b", "b-job/update") not in watch.topics()
    ex = iot.describe_job_execution(jobId="b-job", thingName="thing-b")["execution"]
    assert ex["status"] == "QUEUED" and ex["versionNumber"] == 1


def test_a_thing_can_use_its_own_topics(pair, iot):
    a, _ = pair
    assert a.subscribe(jobs("thing-a", "start-next/+")) == 1
    iot.create_job(jobId="mine", targets=[thing_arn("thing-a")], document=json.dumps({"x": 3}))
    a.publish(jobs("thing-a", "start-next"), b'{"clientToken": "t1"}')
    topic, payload = a.next_message()
    assert topic == jobs("thing-a", "start-next/accepted")
    assert json.loads(payload)["execution"]["jobId"] == "mine"


def commands(thing, suffix):
    return f"$aws/commands/things/{thing}/executions/{suffix}"


def test_acl_file_has_the_commands_topics(mosquitto):
    with open(os.path.join(os.path.dirname(mosquitto.conf), "things.acl")) as f:
        acl = f.read().splitlines()
    for kind, who in (("things", "%u"), ("clients", "%c")):
        prefix = f"$aws/commands/{kind}/{who}/executions/+/"
        assert f"pattern read {prefix}request/#" in acl
        assert f"pattern write {prefix}response/json" in acl
        assert f"pattern read {prefix}response/accepted/json" in acl
        assert f"pattern read {prefix}response/rejected/json" in acl
    # a device publishes only its reports: never a request, a reply or an event
    writes = [line for line in acl if line.startswith("pattern write $aws/commands/")]
    assert all(line.endswith("/response/json") for line in writes), writes


def test_commands_each_thing_on_its_own_topics(pair, iot, jobsd):
    """Subscribe, receive and publish on commands topics: a thing reaches its own executions
    (as the AWS guide's sample policy allows) and nothing of another thing's."""
    a, b = pair
    for topic in (commands("thing-a", "+/request/#"), commands("thing-a", "+/request/json"),
                  commands("thing-a", "+/request/cbor"), commands("thing-a", "+/request"),
                  commands("thing-a", "+/response/accepted/json"),
                  commands("thing-a", "+/response/rejected/json"),
                  "$aws/commands/clients/thing-a/executions/+/request/#"):  # its client id
        assert a.subscribe(topic) == 1, topic
    assert b.subscribe(commands("thing-b", "+/request/#")) == 1
    for topic in (commands("thing-b", "+/request/#"), commands("thing-b", "+/response/+/json"),
                  "$aws/commands/things/+/executions/+/request/json", "$aws/commands/#",
                  "$aws/commands/clients/thing-b/executions/+/request/#",
                  "$aws/events/commandExecution/+/#", commands("thing-a", "+/response/json")):
        rc = a.subscribe(topic)
        assert rc in (0x80, 1), (topic, rc)  # refused, or granted and delivers nothing
    iot.create_command(commandId="ping", payload={"content": b'{"command": "ping"}',
                                                  "contentType": "application/json"})
    start = jobsd.data.start_command_execution
    for_b = start(targetArn=thing_arn("thing-b"),
                  commandArn="arn:aws:iot:us-east-1:123456789012:command/ping")["executionId"]
    for_a = start(targetArn=thing_arn("thing-a"),
                  commandArn="arn:aws:iot:us-east-1:123456789012:command/ping")["executionId"]
    topic, payload = b.next_message()
    assert topic == commands("thing-b", f"{for_b}/request/json") and b"ping" in payload
    # jobsd delivered b's request first: all a got up to its own is all it could get of b's
    seen = []
    while not seen or seen[-1] != commands("thing-a", f"{for_a}/request/json"):
        seen.append(a.next_message()[0])
    assert all(t.startswith(commands("thing-a", "")) for t in seen), seen
    # publishing: b's report topic and a forged reply of its own are dropped by the broker;
    # a's own report reaches jobsd and its reply comes back
    a.publish(commands("thing-b", f"{for_b}/response/json"), b'{"status": "SUCCEEDED"}')
    a.publish(commands("thing-a", f"{for_a}/response/accepted/json"), b'{"executionId": "forged"}')
    a.publish(commands("thing-a", f"{for_a}/response/json"), b'{"status": "SUCCEEDED"}')
    topic, payload = a.next_message()
    assert topic == commands("thing-a", f"{for_a}/response/accepted/json")
    assert json.loads(payload) == {"executionId": for_a}
    status = iot.get_command_execution(executionId=for_b, targetArn=thing_arn("thing-b"))["status"]
    assert status == "CREATED"
    assert iot.get_command_execution(executionId=for_a,
                                     targetArn=thing_arn("thing-a"))["status"] == "SUCCEEDED"
