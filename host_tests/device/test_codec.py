# Request payloads and the statusDetails repairs (PROTOCOL.md 1.5-1.7, 4).
import json
from iotjobs import codec


def test_start_next_payload():
    assert codec.start_next_request("token") == b'{"clientToken": "token"}'
    doc = json.loads(codec.start_next_request("t", {"step": 1}, 5))
    assert doc == {"clientToken": "t", "statusDetails": {"step": "1"}, "stepTimeoutInMinutes": 5}


def test_update_payload_fields():
    doc = json.loads(codec.update_request("t", "SUCCEEDED", {"r": "ok"}, 3, -1))
    assert doc == {
        "status": "SUCCEEDED",
        "clientToken": "t",
        "statusDetails": {"r": "ok"},
        "expectedVersion": 3,
        "stepTimeoutInMinutes": -1,
    }
    assert json.loads(codec.update_request("t", "FAILED")) == {"status": "FAILED", "clientToken": "t"}


def test_details_are_repaired_not_refused():
    d = codec.clean_details({"bad key!": "x\ny", "empty": "", "n": 5, "none": None, "ok": "v"})
    assert d == {"bad_key_": "x y", "empty": "-", "n": "5", "ok": "v"}


def test_details_value_limit_1024():
    d = codec.clean_details({"k": "a" * 5000})
    assert len(d["k"]) == 1024 and d["k"].endswith("...")
    assert codec.clean_details({"k": "a" * 1024})["k"] == "a" * 1024


def test_details_key_limit_and_count():
    d = codec.clean_details({"k" * 200: "v"})
    assert list(d) == ["k" * 128]
    many = {"k%d" % i: "v" for i in range(40)}
    assert len(codec.clean_details(many)) == codec.DETAILS_MAX


def test_details_not_a_dict():
    assert codec.clean_details("oops") == {"result": "oops"}
    assert codec.clean_details(None) is None


def test_parse_rejects_everything_but_objects():
    assert codec.parse(b'{"a": 1}') == {"a": 1}
    for bad in (b"", None, b"[1]", b'"s"', b"{", b"\xff\xfe", b"null", b"12"):
        assert codec.parse(bad) is None, bad


def test_operation():
    assert codec.operation({"operation": "reboot"}) == "reboot"
    for doc in ({"operation": ""}, {"operation": 5}, {}, [], "reboot", None):
        assert codec.operation(doc) is None
