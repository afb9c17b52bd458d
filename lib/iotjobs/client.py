# The Jobs device API over a transport (PROTOCOL.md 1.4-1.9): requests carry a clientToken;
# replies are routed by topic code and matched by that token; notify-next events are kept for
# the runner. Stale, foreign or malformed messages are counted and dropped, never raised.
import time
from micropython import const
from . import codec
from . import topics as T

# Outcome of a request.
ACCEPTED = const(1)
REJECTED = const(2)
TIMEOUT = const(0)
TOO_LARGE = const(3)  # a reply arrived but was larger than the device can hold (transport limit)
NO_MEMORY = const(4)  # a reply (or what may have been one) arrived when the heap could not hold it
_LOST_TOO_LARGE = const(1)  # transport.TOO_LARGE


class JobsClient:
    def __init__(self, transport, thing, reply_timeout_ms=10000, log=None):
        import random

        self.transport = transport
        self.topics = T.Topics(thing)
        self.reply_timeout_ms = reply_timeout_ms
        self.log = log
        self._tag = "%08x" % random.getrandbits(32)
        self._seq = 0
        self._want = 0  # accepted code of the request in flight (its rejected code is +1)
        self._token = None
        self._reply = None
        # notify-next since last taken: True when it named an execution (work is waiting),
        # False when the queue emptied, None when none came. Not parsed: only the trigger matters.
        self.next_event = None
        self.on_sent = None  # called with the request's accepted code once it is published
        self.on_other = None  # gets (topic, msg) of messages on topics that are not jobs topics
        self.replied = False
        self.dropped = 0  # messages that were foreign, stale or malformed
        transport.set_callback(self._on_message)

    def subscribe(self):
        for f in self.topics.filters:
            self.transport.subscribe(f, 1)

    def _on_message(self, topic, msg):
        # Routing decides from the topic alone, without allocating, whether a message is worth
        # parsing: foreign topics and replies nobody waits for are dropped before any JSON.
        want = self._want
        if topic is None:
            # A message the heap could not hold, topic and all: it may have been the reply in
            # flight (ask again) or a notify-next (look again); the commands module may have
            # lost a request.
            if want and self._reply is None:
                self._reply = (NO_MEMORY, None)
            self.next_event = True
            if self.on_other is not None:
                self.on_other(None, None)
            return
        code = self.topics.match(topic)
        if code == T.NONE and self.on_other is not None:
            self.on_other(topic, msg)  # not a jobs topic: the commands module's, or foreign
            return
        if code == T.NONE or (code != T.NOTIFY_NEXT and not (want and (code == want or code == want + 1))):
            self.dropped += 1
            return
        if code == T.NOTIFY_NEXT:
            # A wake-up call, not data: start-next fetches the execution itself. Any notify-next
            # that could name one wakes the runner (a false alarm costs one start-next).
            self.next_event = msg is None or msg.find(b'"execution"') >= 0
            return
        if msg is None:  # drained by the transport: too large to hold, or no memory now
            if self._reply is None:
                too_large = self.transport.lost == _LOST_TOO_LARGE
                # Too large is a verdict only for the accepted reply; a rejected one that does
                # not fit is asked again (it is small unless something is wrong).
                self._reply = (TOO_LARGE if too_large and code == want else NO_MEMORY, None)
            else:
                self.dropped += 1
            return
        try:
            doc = codec.parse(msg)
        except MemoryError:
            # Our reply, most likely (its topic is the one awaited): ask again after a collection.
            if self._reply is None:
                self._reply = (NO_MEMORY, None)
            return
        if doc is None:
            self.dropped += 1
            return
        if doc.get("clientToken") == self._token:
            self._reply = (ACCEPTED if code == want else REJECTED, doc)
            self.replied = True  # the jobs service answers: the firmware's self-test can pass
            return
        self.dropped += 1  # a reply to a request we no longer wait for

    def _call(self, topic, payload, code, token):
        """Publish a request and wait (bounded) for its reply: (ACCEPTED|REJECTED|TIMEOUT|
        TOO_LARGE|NO_MEMORY, doc)."""
        self._want = code
        self._token = token
        self._reply = None
        try:
            self.transport.publish(topic, payload, 0, 1, False)  # the reply is the ack
            if self.on_sent is not None:
                self.on_sent(code)
            deadline = time.ticks_add(time.ticks_ms(), self.reply_timeout_ms)
            while self._reply is None:
                left = time.ticks_diff(deadline, time.ticks_ms())
                if left <= 0:
                    return TIMEOUT, None
                self.transport.wait(left)
            return self._reply
        finally:
            self._want = 0
            self._token = None

    def token(self):
        self._seq += 1
        return "%s-%d" % (self._tag, self._seq)

    def start_next(self, details=None, step_timeout=None):
        t = self.token()
        return self._call(
            self.topics.start_next,
            codec.start_next_request(t, details, step_timeout),
            T.START_NEXT_ACCEPTED,
            t,
        )

    def describe(self, job_id, include_document=True, execution_number=None):
        t = self.token()
        return self._call(
            self.topics.describe(job_id),
            codec.describe_request(t, include_document, execution_number),
            T.DESCRIBE_ACCEPTED,
            t,
        )

    def get_pending(self):
        t = self.token()
        return self._call(self.topics.get, codec.describe_request(t), T.GET_ACCEPTED, t)

    def update(self, job_id, status, details=None, expected_version=None, step_timeout=None,
               execution_number=None, include_state=False):
        t = self.token()
        return self._call(
            self.topics.update(job_id),
            codec.update_request(t, status, details, expected_version, step_timeout,
                                 execution_number, include_state),
            T.UPDATE_ACCEPTED,
            t,
        )

    def take_next_event(self):
        ev = self.next_event
        self.next_event = None
        return ev
