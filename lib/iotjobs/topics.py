# Jobs topic names and recognition (PROTOCOL.md 1.1, 1.10, 4, 6), as bytes, as umqtt delivers
# them. match() is a pure function that never raises on a foreign topic, after Jobs_MatchTopic of
# the AWS Jobs C library.
from micropython import const

THING_MAX = const(128)
JOB_ID_MAX = const(64)
# "$aws/things/" + thing + "/jobs/" + job id + "/update/accepted"
TOPIC_MAX = const(12 + THING_MAX + 6 + JOB_ID_MAX + 16)

# Codes returned by match().
NONE = const(0)
NOTIFY = const(1)
NOTIFY_NEXT = const(2)
GET_ACCEPTED = const(3)
GET_REJECTED = const(4)
START_NEXT_ACCEPTED = const(5)
START_NEXT_REJECTED = const(6)
DESCRIBE_ACCEPTED = const(7)
DESCRIBE_REJECTED = const(8)
UPDATE_ACCEPTED = const(9)
UPDATE_REJECTED = const(10)

_PREFIX = b"$aws/things/"
_NEXT = b"$next"

# Suffixes after "<base>" (no job id) and after "<base><jobId>/" (with one).
_PLAIN = (
    (b"notify", NOTIFY),
    (b"notify-next", NOTIFY_NEXT),
    (b"get/accepted", GET_ACCEPTED),
    (b"get/rejected", GET_REJECTED),
    (b"start-next/accepted", START_NEXT_ACCEPTED),
    (b"start-next/rejected", START_NEXT_REJECTED),
)
_PER_JOB = (
    (b"get/accepted", DESCRIBE_ACCEPTED),
    (b"get/rejected", DESCRIBE_REJECTED),
    (b"update/accepted", UPDATE_ACCEPTED),
    (b"update/rejected", UPDATE_REJECTED),
)


def _valid_char(c, colon):
    return (
        48 <= c <= 57  # 0-9
        or 65 <= c <= 90  # A-Z
        or 97 <= c <= 122  # a-z
        or c == 45  # -
        or c == 95  # _
        or (colon and c == 58)  # : (thing names only)
    )


def _valid_span(buf, start, end, limit, colon):
    n = end - start
    if n < 1 or n > limit:
        return False
    for i in range(start, end):
        if not _valid_char(buf[i], colon):
            return False
    return True


def valid_thing_name(name):
    """True for 1..128 bytes of [A-Za-z0-9:_-]."""
    return _valid_span(name, 0, len(name), THING_MAX, True)


def valid_job_id(job_id, allow_next=False):
    """True for 1..64 bytes of [A-Za-z0-9_-]; `$next` only where Describe takes it."""
    if allow_next and job_id == _NEXT:
        return True
    return _valid_span(job_id, 0, len(job_id), JOB_ID_MAX, False)


def _b(s):
    return s.encode() if isinstance(s, str) else bytes(s)


class Topics:
    """The topics of one thing, built once, so that sending costs no string building."""

    def __init__(self, thing):
        thing = _b(thing)
        if not valid_thing_name(thing):
            raise ValueError("thing name")
        self.thing = thing
        self.start = 0
        self.end = 0
        base = _PREFIX + thing + b"/jobs/"
        self.base = base
        self.notify = base + b"notify"
        self.notify_next = base + b"notify-next"
        self.get = base + b"get"
        self.start_next = base + b"start-next"
        # Filters for the replies: one per API, as the v2 SDKs do (`<request>/+`).
        self.filters = (
            self.notify_next,
            base + b"start-next/+",
            base + b"get/+",
            base + b"+/get/+",
            base + b"+/update/+",
        )

    def describe(self, job_id):
        return self.base + _b(job_id) + b"/get"

    def update(self, job_id):
        return self.base + _b(job_id) + b"/update"

    def match(self, topic):
        """The code of one of this thing's jobs topics, NONE for anything else; never raises,
        never allocates (the hot path of every incoming message). For topics that carry a job
        id, its position is left in `self.start` / `self.end` (see `job_id`)."""
        base = self.base
        n = len(base)
        tlen = len(topic)
        if tlen <= n or not topic.startswith(base):
            return NONE
        for suffix, code in _PLAIN:
            if tlen == n + len(suffix) and topic.endswith(suffix):
                return code
        slash = topic.find(b"/", n)
        if slash <= n:
            return NONE
        for suffix, code in _PER_JOB:
            if tlen == slash + 1 + len(suffix) and topic.endswith(suffix):
                self.start = n
                self.end = slash
                if _valid_span(topic, n, slash, JOB_ID_MAX, False):
                    return code
                # `$next` is valid in the Describe position only.
                if (code == DESCRIBE_ACCEPTED or code == DESCRIBE_REJECTED) and slash - n == 5 \
                        and topic.startswith(_NEXT, n):
                    return code
                return NONE
        return NONE

    def job_id(self, topic):
        """The job id of the topic `match` last recognised (allocates: call only when needed)."""
        return topic[self.start : self.end]
