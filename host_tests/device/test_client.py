# Reply routing in the client: by topic code and clientToken; foreign topics and replies nobody
# waits for are dropped without allocating (before any JSON is parsed).
import micropython
from iotjobs.client import JobsClient, ACCEPTED, REJECTED, TOO_LARGE, NO_MEMORY
from iotjobs.transport import Transport
from iotjobs import transport as TR
from iotjobs import topics as T

B = b"$aws/things/dev1/jobs/"


def _client():
    return JobsClient(Transport(b"dev1", "127.0.0.1", 1), "dev1")


def test_routing_of_unwanted_messages_allocates_nothing():
    c = _client()
    msgs = [
        (b"$aws/things/other/jobs/start-next/accepted", b'{"clientToken":"x"}'),
        (B + b"start-next/accepted", b'{"clientToken":"stale"}'),  # nobody is waiting
        (B + b"job1/update/rejected", b'{"code":"InternalError"}'),
        (B + b"notify", b'{"jobs":{}}'),  # not subscribed to, dropped if it comes
        (b"totally/foreign", b"junk"),
        (B + b"bad$id/get/accepted", b"{}"),
    ]
    micropython.heap_lock()
    try:
        for topic, payload in msgs:
            c._on_message(topic, payload)
    finally:
        micropython.heap_unlock()
    assert c.dropped == len(msgs)
    assert c.next_event is None and c._reply is None


def test_reply_matched_by_code_and_token():
    c = _client()
    c._want, c._token = T.UPDATE_ACCEPTED, "tok-1"
    c._on_message(B + b"j/update/accepted", b'{"clientToken":"other"}')
    assert c._reply is None and c.dropped == 1
    c._on_message(B + b"j/get/accepted", b'{"clientToken":"tok-1"}')  # wrong API
    assert c._reply is None and c.dropped == 2
    c._on_message(B + b"j/update/rejected", b'{"clientToken":"tok-1","code":"VersionMismatch"}')
    assert c._reply == (REJECTED, {"clientToken": "tok-1", "code": "VersionMismatch"})
    c._reply = None
    c._on_message(B + b"j/update/accepted", b'{"clientToken":"tok-1"}')
    assert c._reply[0] == ACCEPTED


def test_malformed_replies_are_dropped():
    c = _client()
    c._want, c._token = T.START_NEXT_ACCEPTED, "t"
    for payload in (b"{", b"[]", b"\\xff", b"", b'"t"', b"null"):
        c._on_message(B + b"start-next/accepted", payload)
    assert c._reply is None and c.dropped == 6


def test_oversized_reply_is_reported():
    c = _client()
    c._want, c._token = T.START_NEXT_ACCEPTED, "t"
    c.transport.lost = TR.TOO_LARGE
    c._on_message(B + b"start-next/accepted", None)
    assert c._reply == (TOO_LARGE, None)


def test_a_reply_the_heap_could_not_hold_is_no_verdict():
    c = _client()
    c._want, c._token = T.START_NEXT_ACCEPTED, "t"
    c.transport.lost = TR.NO_MEMORY  # under the limit, but no memory for it now
    c._on_message(B + b"start-next/accepted", None)
    assert c._reply == (NO_MEMORY, None)
    # an oversized *rejected* reply is no verdict either: ask again
    c._reply = None
    c.transport.lost = TR.TOO_LARGE
    c._on_message(B + b"start-next/rejected", None)
    assert c._reply == (NO_MEMORY, None)


def test_a_message_lost_topic_and_all_wakes_everything_up():
    c = _client()
    c._want, c._token = T.UPDATE_ACCEPTED, "t"
    others = []
    c.on_other = lambda t, m: others.append((t, m))
    c._on_message(None, None)
    assert c._reply == (NO_MEMORY, None)  # it may have been the reply: ask again
    assert c.take_next_event() is True  # it may have been a notify-next: look again
    assert others == [(None, None)]  # it may have been a command request


def test_a_reply_that_cannot_be_parsed_for_lack_of_memory_is_asked_again():
    c = _client()
    c._want, c._token = T.START_NEXT_ACCEPTED, "t"
    topic, payload = B + b"start-next/accepted", b'{"clientToken":"t","execution":{"jobId":"a"}}'
    micropython.heap_lock()  # json.loads cannot allocate: MemoryError in codec.parse
    try:
        c._on_message(topic, payload)
    finally:
        micropython.heap_unlock()
    assert c._reply == (NO_MEMORY, None)
    assert c.dropped == 0


def test_notify_next_is_a_wake_up_call():
    c = _client()
    c._on_message(B + b"notify-next", b'{"execution":{"jobId":"a"},"timestamp":1}')
    assert c.take_next_event() is True
    assert c.take_next_event() is None
    c._on_message(B + b"notify-next", b'{"timestamp":1}')  # the queue emptied
    assert c.take_next_event() is False
    c._on_message(B + b"notify-next", None)  # too large to hold: it surely named one
    assert c.take_next_event() is True
    topic, payload = B + b"notify-next", b'{"execution":{"jobId":"b"}}'
    micropython.heap_lock()  # no parsing, no allocation
    try:
        c._on_message(topic, payload)
    finally:
        micropython.heap_unlock()
    assert c.take_next_event() is True
