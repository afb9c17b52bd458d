# AWS IoT commands on the device (PROTOCOL.md 1.11): one request to one device, answered in
# seconds. The service publishes the command's payload on
#   $aws/commands/things/<T>/executions/<E>/request[/json|/cbor]
# and the device reports on .../executions/<E>/response/json, answered on
# .../response/accepted/json or .../response/rejected/json (`error`/`errorMessage`, no token).
#
# Payloads are JSON objects whose `command` member names the handler; the other members are its
# arguments. A handler is `fn(ctx, args) -> dict` (values: str -> {"s"}, bool -> {"b"}, bytes ->
# {"bin"}, anything else -> {"s": str(v)}); it raises CommandFailed / CommandRejected with a
# reasonCode. Unknown commands, non-JSON payloads and payloads without `command` end REJECTED.
#
# Journaled like jobs, in a journal of their own (`commands.json`, the same atomic Journal):
# start (before any side effect) -> finish (the report in the outbox) -> acknowledged (the id in
# the done list). After a reset an interrupted command is never run again: `reboot` (whose
# reset is the point) is SUCCEEDED when the boot counter moved, anything else FAILED
# INTERRUPTED; a request for an execution already done is dropped. Requests arrive in the MQTT
# callback and wait in a small queue; the runner's loop runs them between job steps.
#
# Memory: a request stays queued until it is journaled, so a MemoryError before that only
# delays it. A handler that runs out of memory ends FAILED OUT_OF_MEMORY; a request whose
# payload the heap could not hold (under the size limit) ends FAILED OUT_OF_MEMORY, not
# PAYLOAD_TOO_LARGE: the service has no way to send it again, so the caller is told at once.
import binascii
import json
import time
from micropython import const

_QUEUE_MAX = const(4)
_EXEC_MAX = const(64)
_REASON_MAX = const(64)
_DESC_MAX = const(1024)
_RESULT_MAX = const(1024)

KIND_REQUEST = const(1)
KIND_ACCEPTED = const(2)
KIND_REJECTED = const(3)
_KIND_LOST = const(4)
_LOST_NO_MEMORY = const(2)  # transport.NO_MEMORY

# Rejections that say the execution is settled (or never was ours): nothing more to say.
_SETTLED = ("InvalidStateTransition", "ResourceNotFound", "TerminalStateReached",
            "InvalidRequest", "InvalidJson", "InvalidTopic")

IN_PROGRESS = "IN_PROGRESS"
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
REJECTED = "REJECTED"


class CommandFailed(Exception):
    status = FAILED

    def __init__(self, reason, description=None):
        super().__init__(reason)
        self.reason = reason
        self.description = description


class CommandRejected(CommandFailed):
    status = REJECTED


def _valid_id(buf, start, end):
    n = end - start
    if n < 1 or n > _EXEC_MAX:
        return False
    for i in range(start, end):
        c = buf[i]
        if not (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122 or c == 45 or c == 95):
            return False
    return True


def reason_code(text):
    """A reasonCode the service accepts: [A-Z0-9_-], 1..64."""
    out = ""
    for c in str(text).upper()[:_REASON_MAX]:
        out += c if ("A" <= c <= "Z" or "0" <= c <= "9" or c in "_-") else "_"
    return out or "UNKNOWN"


def _clean(text, limit):
    out = ""
    for c in str(text)[:limit]:
        out += c if c >= " " and c != "\x7f" else " "
    return out


def result_values(result):
    """{name: {"s"|"b"|"bin": value}} of a handler's returned dict."""
    out = {}
    if not isinstance(result, dict):
        return out
    for k, v in result.items():
        if isinstance(v, bool):
            out[str(k)] = {"b": v}
        elif isinstance(v, (bytes, bytearray)):
            out[str(k)] = {"bin": binascii.b2a_base64(v).decode().strip()}
        else:
            s = v if isinstance(v, str) else json.dumps(v)
            out[str(k)] = {"s": s[:_RESULT_MAX] if s else "-"}
    return out


def report(status, reason=None, description=None, result=None):
    """The payload of an UpdateCommandExecution report."""
    body = {"status": status}
    if reason:
        sr = {"reasonCode": reason_code(reason)}
        if description:
            sr["reasonDescription"] = _clean(description, _DESC_MAX)
        body["statusReason"] = sr
    if result:
        body["result"] = result
    return json.dumps(body)


class CommandContext:
    """What a command handler sees: the execution id, the boot counter, progress, reboot."""

    def __init__(self, commands, execution_id):
        self.commands = commands
        self.id = execution_id
        self.boot = commands.boot()

    def progress(self):
        """Report IN_PROGRESS (the service then shows the command started)."""
        return self.commands.send(self.id, report(IN_PROGRESS))

    def request_reboot(self):
        """Reset now; after the boot the command is SUCCEEDED {"rebooted": true}."""
        self.commands.reboot_requested(self.id)


class Commands:
    def __init__(self, client, journal, boot_journal, handlers=None, log=print, reset=None,
                 reply_timeout_ms=10000, retry_ms=2000, on_point=None):
        self.client = client
        self.transport = client.transport
        self.journal = journal  # a Journal of its own (commands.json): job = the command
        self.boot_journal = boot_journal  # the runner's journal: the boot counter
        self.handlers = dict(handlers or {})
        self.log = log
        self.reset = reset
        self.reply_timeout_ms = reply_timeout_ms
        self.retry_ms = retry_ms
        thing = client.topics.thing
        self.prefix = b"$aws/commands/things/" + thing + b"/executions/"
        self.filters = (self.prefix + b"+/request/#", self.prefix + b"+/response/+/json")
        self.queue = []  # (execution id, payload bytes or None when it was too large, format)
        # What the MQTT callback receives goes into fixed slots (a ring): the callback
        # allocates nothing, so no MemoryError can lose a request that has arrived whole. The
        # loop moves them into `queue` (_intake).
        self._in_topic: "list" = [None] * _QUEUE_MAX  # bytes, or None when free
        self._in_msg = [None] * _QUEUE_MAX
        self._in_lost = [0] * _QUEUE_MAX  # the transport's `lost` when msg is None
        self._in_head = 0
        self._in_n = 0
        self._want = None  # execution id whose report awaits its answer
        self._want_b = None  # the same, as bytes (matched against topics without allocating)
        self._reply = 0  # the answer's kind (0: none yet)
        self._reply_msg = None
        self._retry_at = None
        self._recovered = False
        self.dropped = 0
        self.lost = 0  # messages the heap could not hold (requests among them are failed)
        self.done = 0
        self.on_point = on_point  # tests halt the device at named points
        client.on_other = self._on_message

    def point(self, name):
        if self.on_point is not None:
            self.on_point(name)

    def boot(self):
        return self.boot_journal.boot

    def register(self, name, handler):
        self.handlers[name] = handler

    def subscribe(self):
        for f in self.filters:
            self.transport.subscribe(f, 1)

    # -- incoming (MQTT callback: no I/O here) ------------------------------------------------
    def recover(self):
        """After a memory fault: what the journal says is all that is known."""
        self._recovered = False
        self._want = None
        self._want_b = None

    def _on_message(self, topic, msg):
        # Allocation-free: bytes compared in place, references stored in fixed slots.
        p = self.prefix
        n = len(p)
        if topic is None:  # a message lost for lack of memory: maybe the answer awaited
            self.lost += 1
            if self._want_b is not None and not self._reply:
                self._reply = _KIND_LOST
            return
        if not topic.startswith(p):
            self.dropped += 1
            return
        slash = topic.find(b"/", n)
        if slash < 0 or not _valid_id(topic, n, slash):
            self.dropped += 1
            return
        tail = len(topic) - slash
        if (tail == 8 and topic.endswith(b"/request")) or (tail == 13 and (
                topic.endswith(b"/request/json") or topic.endswith(b"/request/cbor"))):
            kind = KIND_REQUEST
        elif tail == 23 and topic.endswith(b"/response/accepted/json"):
            kind = KIND_ACCEPTED
        elif tail == 23 and topic.endswith(b"/response/rejected/json"):
            kind = KIND_REJECTED
        else:
            self.dropped += 1
            return
        if kind == KIND_REQUEST:
            k = self._in_n
            if k + len(self.queue) >= _QUEUE_MAX:
                self.dropped += 1  # the service times it out; the device stays responsive
                return
            i = self._in_head
            for _ in range(k):
                if self._in_topic[i] == topic:
                    self.dropped += 1  # a duplicate delivery
                    return
                i = (i + 1) % _QUEUE_MAX
            self._in_topic[i] = topic
            self._in_msg[i] = msg
            self._in_lost[i] = 0 if msg is not None else self.transport.lost
            self._in_n = k + 1
            return
        w = self._want_b
        if w is not None and not self._reply and slash - n == len(w) and topic.startswith(w, n):
            self._reply = kind
            self._reply_msg = msg
        else:
            self.dropped += 1

    def _intake(self):
        """Move what the callback received into `queue` (allocates: the loop's side)."""
        while self._in_n:
            i = self._in_head
            topic = self._in_topic[i]
            n = len(self.prefix)
            slash = topic.find(b"/", n)
            eid = topic[n:slash].decode()
            if any(q[0] == eid for q in self.queue):
                self.dropped += 1
            else:
                fmt = topic[slash + 9:]  # after "/request/"
                msg = self._in_msg[i]
                if msg is None and self._in_lost[i] == _LOST_NO_MEMORY:
                    self.lost += 1
                    fmt = b"oom"
                self.queue.append((eid, msg if fmt == b"json" else None, fmt))  # None: too large
            self._in_topic[i] = None
            self._in_msg[i] = None
            self._in_head = (i + 1) % _QUEUE_MAX
            self._in_n -= 1

    # -- talking to the service ---------------------------------------------------------------
    def send(self, eid, payload):
        """Publish a report and wait (bounded) for its answer: "accepted", "settled" (rejected
        as already final / not ours), or None (no answer, or a transient rejection)."""
        w = eid.encode()
        topic = self.prefix + w + b"/response/json"
        body = payload.encode() if isinstance(payload, str) else payload
        self._want = eid
        self._want_b = w
        self._reply = 0
        self._reply_msg = None
        try:
            self.transport.publish(topic, body, 0, 1, False)
            deadline = time.ticks_add(time.ticks_ms(), self.reply_timeout_ms)
            while not self._reply:
                left = time.ticks_diff(deadline, time.ticks_ms())
                if left <= 0:
                    return None
                self.transport.wait(left)
            kind = self._reply
            if kind == KIND_ACCEPTED:
                return "accepted"
            if kind == _KIND_LOST:
                return None
            doc = None
            if self._reply_msg is not None:
                try:
                    doc = json.loads(self._reply_msg)
                except ValueError:
                    doc = None
            if not isinstance(doc, dict):
                doc = {}
            err = doc.get("error")
            self.log("command %s: report rejected: %s (%s)" % (eid, err, doc.get("errorMessage")))
            return "settled" if err in _SETTLED else None
        finally:
            self._want = None
            self._want_b = None
            self._reply_msg = None

    # -- the runner's loop --------------------------------------------------------------------
    def busy(self):
        """True when there is something to do: a report to deliver, a boot to reconcile, or a
        request waiting."""
        return bool(self.queue) or self._in_n > 0 or self.journal.out is not None \
            or not self._recovered or self.journal.job is not None

    def step(self):
        """One piece of work (called by the runner's loop when busy())."""
        j = self.journal
        if self._retry_at is not None:
            if time.ticks_diff(self._retry_at, time.ticks_ms()) > 0:
                return False
            self._retry_at = None
        if j.out is not None:
            self._flush()
            return True
        if not self._recovered:
            self._recovered = True
            if j.job is not None:
                self._reconcile()
                return True
        self._intake()
        if self.queue:
            eid, msg, fmt = self.queue[0]  # dequeued once journaled (or dropped)
            self._run(eid, msg, fmt)
            return True
        return False

    def _reconcile(self):
        """A command was running when the device reset: never run it again."""
        j = self.journal.job
        cp = j.get("cp") or {}
        if cp.get("reboot") is not None and self.boot() > cp["reboot"]:
            self._finish(SUCCEEDED, None, None, {"rebooted": {"b": True}})
        else:
            self._finish(FAILED, "INTERRUPTED", "the device restarted while the command ran",
                         None)

    def _dequeue(self):
        if self.queue:
            self.queue.pop(0)

    def _run(self, eid, msg, fmt):
        j = self.journal
        if j.finished_status(eid, 0) is not None:
            self._dequeue()
            self.log("command %s: done already; request dropped" % eid)
            return
        if fmt != b"json" or msg is None:
            j.start(eid, 0, None)
            self._dequeue()
            if fmt == b"oom":
                self._finish(FAILED, "OUT_OF_MEMORY", "the request arrived when the device "
                             "had no memory to hold it; send it again", None)
            elif fmt != b"json":
                self._finish(REJECTED, "UNSUPPORTED_PAYLOAD", "payload format %s: this device "
                             "takes JSON" % (fmt.decode() or "other"), None)
            else:
                self._finish(REJECTED, "PAYLOAD_TOO_LARGE", "the payload did not fit", None)
            return
        try:
            args = json.loads(msg)
        except ValueError:
            args = None
        name = args.get("command") if isinstance(args, dict) else None
        j.start(eid, 0, None)  # before any side effect
        self._dequeue()
        self.point("command-journaled")
        if not isinstance(name, str):
            self._finish(REJECTED, "BAD_PAYLOAD", "expected a JSON object with a command member",
                         None)
            return
        h = self.handlers.get(name)
        if h is None:
            self._finish(REJECTED, "UNKNOWN_COMMAND", "no handler for %r" % name, None)
            return
        ctx = CommandContext(self, eid)
        try:
            result = result_values(h(ctx, args))
            status, reason, desc = SUCCEEDED, None, None
        except CommandFailed as e:
            status, reason, desc, result = e.status, e.reason, e.description, None
        except MemoryError:
            import gc

            gc.collect()
            status, reason, desc, result = FAILED, "OUT_OF_MEMORY", "the device ran out of " \
                "memory while running the command", None
        except Exception as e:  # a handler bug must not take the loop down
            status, reason, desc, result = FAILED, "HANDLER_ERROR", "%s: %s" % (
                type(e).__name__, e), None
        self._finish(status, reason, desc, result)

    def reboot_requested(self, eid):
        if self.reset is None:
            raise CommandFailed("REBOOT_UNAVAILABLE", "this device cannot reset itself")
        self.journal.checkpoint(0, {"reboot": self.boot()})
        self.send(eid, report(IN_PROGRESS))
        self.log("command %s: reboot" % eid)
        self.reset()
        raise CommandFailed("RESET_FAILED", "the device did not reset")

    def _finish(self, status, reason, desc, result):
        j = self.journal.job
        # The outcome goes to flash first (tried again after a MemoryError: the failed
        # attempt's garbage is freed as it unwinds); then the log line.
        for k in range(3):
            try:
                self.journal.finish(status, {"p": report(status, reason, desc, result)}, None)
                break
            except MemoryError:
                if k == 2:
                    raise
                import gc

                gc.collect()
        try:
            self.log("command %s: %s%s" % (j["id"], status, " " + reason if reason else ""))
        except MemoryError:
            pass
        self.point("command-finished")
        self._flush()

    def _flush(self):
        eid, _, status, details, _ = self.journal.out
        try:
            res = self.send(eid, details.get("p") if details else report(status))
        except OSError:
            self._retry_at = time.ticks_add(time.ticks_ms(), self.retry_ms)
            raise
        if res is None:
            self._retry_at = time.ticks_add(time.ticks_ms(), self.retry_ms)
            return
        self.point("command-answered")
        self.journal.acknowledged()
        self.done += 1
