# Topic building and matching, with the AWS Jobs C library's vectors (PROTOCOL.md section 6).
from iotjobs import topics as T

FOO = T.Topics("foobar")
B = b"$aws/things/foobar/jobs/"


def match_id(topics, topic):
    code = topics.match(topic)
    return code, topics.job_id(topic)


def test_generated_topics():
    assert FOO.notify == b"$aws/things/foobar/jobs/notify"
    assert FOO.notify_next == b"$aws/things/foobar/jobs/notify-next"
    assert FOO.start_next == b"$aws/things/foobar/jobs/start-next"
    assert FOO.get == b"$aws/things/foobar/jobs/get"
    assert FOO.describe("$next") == b"$aws/things/foobar/jobs/$next/get"
    assert FOO.describe(b"1234") == b"$aws/things/foobar/jobs/1234/get"
    assert FOO.update("1234") == b"$aws/things/foobar/jobs/1234/update"


def test_filters_cover_every_reply():
    assert FOO.notify_next in FOO.filters
    assert B + b"+/update/+" in FOO.filters
    assert B + b"+/get/+" in FOO.filters
    assert B + b"start-next/+" in FOO.filters
    assert B + b"get/+" in FOO.filters


def test_match_plain_topics():
    assert FOO.match(B + b"notify") == T.NOTIFY
    assert FOO.match(B + b"notify-next") == T.NOTIFY_NEXT
    assert FOO.match(B + b"get/accepted") == T.GET_ACCEPTED
    assert FOO.match(B + b"get/rejected") == T.GET_REJECTED
    assert FOO.match(B + b"start-next/accepted") == T.START_NEXT_ACCEPTED
    assert FOO.match(B + b"start-next/rejected") == T.START_NEXT_REJECTED


def test_match_job_topics():
    assert match_id(FOO, B + b"12345/get/accepted") == (T.DESCRIBE_ACCEPTED, b"12345")
    assert match_id(FOO, B + b"ab224-z/get/rejected") == (T.DESCRIBE_REJECTED, b"ab224-z")
    assert match_id(FOO, B + b"$next/get/accepted") == (T.DESCRIBE_ACCEPTED, b"$next")
    assert match_id(FOO, B + b"$next/get/rejected") == (T.DESCRIBE_REJECTED, b"$next")
    assert match_id(FOO, B + b"12345/update/accepted") == (T.UPDATE_ACCEPTED, b"12345")
    assert match_id(FOO, B + b"ab224-z/update/rejected") == (T.UPDATE_REJECTED, b"ab224-z")


def test_no_match():
    for topic in (
        B + b"notifyzz",
        B + b"ab224-z/update/rejectedzz",
        b"$aws/things/foobarzz",
        b"$aws/things/foobar/jobz/notify",
        b"$aws/things/FOOBAR/jobs/notify",
        b"$awz/thingz/foobar/jobs/notify",
        b"$aws/things/other/jobs/notify-next",
        B + b"$next/update/accepted",  # $next is not valid for update
        B + b"a:b/get/accepted",  # colon is for thing names only
        B + b"/get/accepted",
        B + b"x" * 65 + b"/get/accepted",
        B,
        b"",
    ):
        assert FOO.match(topic) == T.NONE, topic


def test_match_never_raises_on_junk():
    for topic in (b"\xff\xfe", B + b"\x00/get/accepted", B + b"j/" * 40, bytes(range(256))):
        assert FOO.match(topic) == T.NONE


def test_identifier_validation():
    assert T.valid_thing_name(b"-_0-9A-Za-z")
    assert T.valid_job_id(b"-_0-9A-Za-z")
    assert T.valid_thing_name(b"a:b")
    assert not T.valid_job_id(b"a:b")
    assert not T.valid_thing_name(b"a!b")
    assert not T.valid_job_id(b"a!b")
    assert T.valid_job_id(b"$next", True)
    assert not T.valid_job_id(b"$next")
    assert T.valid_thing_name(b"t" * 128) and not T.valid_thing_name(b"t" * 129)
    assert T.valid_job_id(b"j" * 64) and not T.valid_job_id(b"j" * 65)
    assert not T.valid_thing_name(b"")


def test_bad_thing_name_is_a_programming_error():
    try:
        T.Topics("bad/name")
    except ValueError:
        return
    raise AssertionError("Topics accepted a thing name with a slash")


def test_longest_topic_is_226_bytes():
    t = T.Topics("t" * 128)
    topic = t.update("j" * 64) + b"/accepted"
    assert len(topic) == T.TOPIC_MAX == 226
    assert match_id(t, topic) == (T.UPDATE_ACCEPTED, b"j" * 64)


def test_match_allocates_nothing():
    import micropython

    topics = [B + b"notify-next", B + b"12345/update/accepted", B + b"$next/get/rejected",
              B + b"start-next/accepted", b"$aws/things/other/jobs/notify-next", B + b"x/update/nope",
              B + b"a:b/get/accepted", b"", B + b"j" * 70 + b"/get/accepted"]
    codes = [0] * len(topics)
    micropython.heap_lock()  # any allocation now raises MemoryError
    try:
        for i in range(len(topics)):
            codes[i] = FOO.match(topics[i])
    finally:
        micropython.heap_unlock()
    assert codes == [T.NOTIFY_NEXT, T.UPDATE_ACCEPTED, T.DESCRIBE_REJECTED, T.START_NEXT_ACCEPTED,
                     T.NONE, T.NONE, T.NONE, T.NONE, T.NONE]
