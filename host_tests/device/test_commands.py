# The device side of AWS IoT commands without a network: topic routing of requests and
# answers (foreign, malformed and oversized ones), the queue bound, the report payloads, reason
# codes and typed results. The end-to-end behaviour is in host_tests/test_commands.py.
import json
import micropython
from iotjobs import cmdbuiltin as B
from iotjobs import commands as C
from iotjobs.topics import Topics

THING = "dev1"
P = b"$aws/commands/things/dev1/executions/"


class Journal:
    """Only what Commands reads at construction and in busy()."""

    boot = 1
    out = None
    job = None


class Client:
    def __init__(self):
        self.topics = Topics(THING)
        self.transport = None
        self.on_other = None


def _commands():
    return C.Commands(Client(), Journal(), Journal())


def test_requests_are_queued_by_execution_id_and_format():
    c = _commands()
    c._on_message(P + b"e-1/request/json", b'{"command": "ping"}')
    c._on_message(P + b"e_2/request/cbor", b"\xa0")
    c._on_message(P + b"e3/request", b"raw")
    assert c.busy() and c.queue == []  # received into the callback's slots, not yet queued
    c._intake()
    assert [(e, f) for e, _, f in c.queue] == [("e-1", b"json"), ("e_2", b"cbor"), ("e3", b"")]
    assert c.queue[0][1] == b'{"command": "ping"}'
    assert c.queue[1][1] is None and c.queue[2][1] is None, "non-JSON payloads are not kept"


def test_foreign_and_malformed_topics_are_dropped():
    c = _commands()
    for t in (b"$aws/commands/things/dev2/executions/e/request/json",
              b"$aws/commands/clients/dev1/executions/e/request/json",
              P + b"/request/json", P + b"bad id/request/json", P + b"e" * 65 + b"/request/json",
              P + b"e/request/xml", P + b"e/response/json", P + b"e", b"$aws/things/dev1/jobs/x",
              P + b"e/request/json/extra"):
        c._on_message(t, b"{}")
    c._intake()
    assert c.queue == [] and c.dropped == 10


def test_the_queue_is_bounded_and_duplicates_are_dropped():
    c = _commands()
    for i in range(6):
        c._on_message(P + b"e%d/request/json" % i, b"{}")
    c._on_message(P + b"e0/request/json", b"{}")
    c._intake()
    assert [e for e, _, _ in c.queue] == ["e0", "e1", "e2", "e3"]
    assert c.dropped == 3
    c._on_message(P + b"e9/request/json", b"{}")  # the queue is full: dropped
    c.queue.pop(0)
    c._on_message(P + b"e1/request/json", b"{}")  # already queued: dropped at intake
    c._intake()
    assert [e for e, _, _ in c.queue] == ["e1", "e2", "e3"] and c.dropped == 5


def test_receiving_allocates_nothing():
    # a request or an answer that has arrived whole is never lost to a MemoryError in the
    # callback: it only stores references in fixed slots
    c = _commands()
    c._want, c._want_b = "e1", b"e1"
    req, ans = P + b"e5/request/json", P + b"e1/response/accepted/json"
    micropython.heap_lock()
    try:
        c._on_message(req, b'{"command": "ping"}')
        c._on_message(ans, b"{}")
        c._on_message(None, None)
    finally:
        micropython.heap_unlock()
    c._intake()
    assert c.queue == [("e5", b'{"command": "ping"}', b"json")]
    assert c._reply == C.KIND_ACCEPTED and c.lost == 1


def test_answers_route_only_to_the_report_waited_for():
    c = _commands()
    c._on_message(P + b"e1/response/accepted/json", b'{"executionId": "e1"}')
    assert not c._reply and c.dropped == 1
    c._want, c._want_b = "e1", b"e1"
    c._on_message(P + b"e2/response/accepted/json", b"{}")
    c._on_message(P + b"e11/response/accepted/json", b"{}")  # e1 is a prefix of e11
    assert not c._reply and c.dropped == 3
    c._on_message(P + b"e1/response/rejected/json", b'{"error": "InvalidStateTransition"}')
    assert c._reply == C.KIND_REJECTED
    assert c._reply_msg == b'{"error": "InvalidStateTransition"}'
    c._reply = 0
    c._on_message(P + b"e1/response/accepted/json", b"not json")
    assert c._reply == C.KIND_ACCEPTED


def test_reports_and_reason_codes():
    assert C.reason_code("bad argument!") == "BAD_ARGUMENT_"
    assert C.reason_code("x" * 100) == "X" * 64
    assert C.reason_code("") == "UNKNOWN"
    body = json.loads(C.report("FAILED", "disk full", "no\nspace", {"n": {"s": "1"}}))
    assert body == {"status": "FAILED", "statusReason": {"reasonCode": "DISK_FULL",
                                                         "reasonDescription": "no space"},
                    "result": {"n": {"s": "1"}}}
    assert json.loads(C.report("SUCCEEDED")) == {"status": "SUCCEEDED"}


def test_result_values_are_typed():
    r = C.result_values({"a": "x", "b": True, "c": b"\x00\x01", "d": 5, "e": [1], "f": ""})
    assert r == {"a": {"s": "x"}, "b": {"b": True}, "c": {"bin": "AAE="}, "d": {"s": "5"},
                 "e": {"s": "[1]"}, "f": {"s": "-"}}
    assert C.result_values(None) == {}
    assert len(C.result_values({"long": "y" * 5000})["long"]["s"]) == 1024


def test_get_config_scrubs_secrets_at_any_depth():
    cfg = {"thing": "dev1", "tls": {"key": "k.der"}, "ota": {"pubkey": "p", "allow": ["a"]},
           "wifi": {"ssid": "home", "password": "x"}, "api_token": "t", "port": 8883}
    def h(ctx, args):
        return B.get_config(ctx, args, cfg)

    assert h(None, {}) == {"thing": "dev1", "ota": {"allow": ["a"]}, "wifi": {"ssid": "home"},
                           "port": 8883}
    assert h(None, {"keys": ["port", "tls"]}) == {"port": 8883}
    try:
        h(None, {"keys": "port"})
        raise AssertionError("accepted keys that are not a list")
    except C.CommandRejected as e:
        assert e.reason == "BAD_ARGUMENT"
