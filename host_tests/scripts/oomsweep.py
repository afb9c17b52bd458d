# Run by host_tests/test_memory.py under the unix port: the real firmware wiring (app.build, with
# the test handlers and commands on) against a real mosquitto and jobsd, every function of the
# device library turned into an out-of-memory seam (oominject). The host drives it over stdin:
#
#   go N KIND ID   arm the fault at the N-th seam call from now (0: none), then run the loop
#                  until the job (KIND job, ID its job id) or the command (KIND command, ID its
#                  execution id) is settled on the device and the loop is idle again
#
# and reads one line back per point:  DONE {"settled", "calls", "fired", "faults", "timeouts",
# "connects", "no_answer", "lost", "ms"}.
import sys
import json
import os
import time

with open(sys.argv[1]) as f:
    args = json.load(f)
sys.path.append(args["inject"])
os.chdir(args["flash"])

import app  # noqa: E402 (firmware/app.py, as compiled for the device)
from iotjobs import runner as R, client as C, journal as J, codec as K  # noqa: E402
from iotjobs import transport as TR, commands as CM, topics as T  # noqa: E402
from oominject import Injector  # noqa: E402

stats = {"timeouts": 0, "connects": 0, "no_answer": 0}

# counters first (they are not seams themselves: the injector wraps them)
_call = C.JobsClient._call


def _counted_call(self, topic, payload, code, token):
    r = _call(self, topic, payload, code, token)
    if r[0] == C.TIMEOUT:
        stats["timeouts"] += 1
    return r


C.JobsClient._call = _counted_call
_connect = TR.Transport.connect


def _counted_connect(self, clean_session=True):
    stats["connects"] += 1
    return _connect(self, clean_session)


TR.Transport.connect = _counted_connect
_send = CM.Commands.send


def _counted_send(self, eid, payload):
    r = _send(self, eid, payload)
    if r is None and not self._reply:  # waited out (not an answer lost for lack of memory)
        stats["no_answer"] += 1
    return r


CM.Commands.send = _counted_send

cfg = {"thing": args["thing"], "host": "127.0.0.1", "port": args["port"], "keepalive": 60,
       "test_handlers": True, "commands": True}
runner = app.build(cfg)
runner.oom_backoff_ms = 1
runner.client.reply_timeout_ms = args.get("reply_ms", 3000)
runner.commands.reply_timeout_ms = args.get("reply_ms", 3000)
runner.retry_ms = 50
runner.commands.retry_ms = 50
runner._backoff = 50

inj = Injector()
inj.patch_class(R.Runner, skip=("run",))  # the loop itself is what recovers
inj.patch_class(R.Context)
inj.patch_module(R)
inj.patch_class(C.JobsClient)
inj.patch_class(J.Journal)
inj.patch_module(K)
# The polling and byte-reading internals are left out here (their call counts follow the timing
# of packets, which would shift every later point); host_tests/device/test_transport_memory.py
# sweeps every one of them.
inj.patch_class(TR.Transport, skip=("_keepalive", "_try_byte", "_fill", "_skip", "_readinto",
                                    "_recv_len"))
inj.patch_class(type(runner.client.transport))  # the firmware's watchdog-feeding subclass
inj.patch_class(CM.Commands)
inj.patch_class(CM.CommandContext)
inj.patch_module(CM)
inj.patch_class(T.Topics)
import testhandlers  # noqa: E402

inj.patch_class(testhandlers.Effect)
inj.patch_module(testhandlers)
inj.patch_attr(runner.handlers["demo"], "fn", "app.demo")
inj.patch_attr(runner, "log", "log")
inj.patch_attr(runner.commands, "log", "log")
# callbacks and handlers bound before the patching (they hold the original functions)
inj.patch_attr(runner.client.transport, "cb", "JobsClient._on_message")
inj.patch_attr(runner.client, "on_other", "Commands._on_message")
inj.patch_attr(runner.client, "on_sent", "Runner._sent")
inj.patch_item(runner.commands.handlers, "effect", "testhandlers.command_effect")
inj.patch_item(runner.commands.handlers, "ping", "cmdbuiltin.ping")


# The script's own checks read attributes only: a call of a patched method here would be a
# seam outside the loop that recovers from it.
def _done(journal, ident, number):
    prefix = "%s:%s:" % (ident, number)
    for entry in journal.done:
        if entry.startswith(prefix):
            return True
    return False


def idle():
    c = runner.commands
    return (runner.client.transport.sock is not None and not runner._want_next
            and runner._retry_at is None and not runner._recover
            and runner.journal.job is None and runner.journal.out is None
            and not c.queue and not c._in_n and c.journal.job is None and c.journal.out is None
            and c._recovered)


lost_before = [0]


def settled(kind, ident):
    if kind == "job":
        done = _done(runner.journal, ident, 1)
    else:
        # a request lost whole (not even its topic could be held) is gone: the device cannot
        # know it existed, and the service times it out
        done = _done(runner.commands.journal, ident, 0) or (
            runner.client.transport.lost_count > lost_before[0]
            and not any(q[0] == ident for q in runner.commands.queue))
    return done and idle()


deadline = [0]


def until_settled(kind, ident):
    return settled(kind, ident) or time.ticks_diff(time.ticks_ms(), deadline[0]) > 0


deadline[0] = time.ticks_add(time.ticks_ms(), 20000)
runner.run(until=lambda: idle() or time.ticks_diff(time.ticks_ms(), deadline[0]) > 0)
print("READY %d" % inj.patched)
while True:
    line = sys.stdin.readline()
    if not line:
        break
    words = line.split()
    if not words or words[0] != "go":
        continue
    n, kind, ident = int(words[1]), words[2], words[3]
    before = (runner.memory_faults, stats["timeouts"], stats["connects"], stats["no_answer"],
              runner.client.transport.lost_count)
    t0 = time.ticks_ms()
    lost_before[0] = before[4]
    runner.commands.lost = 0
    deadline[0] = time.ticks_add(t0, 20000)
    if kind == "job":
        runner._want_next = True  # as the notify-next waiting in the socket would
    inj.arm(n)
    runner.run(until=lambda: until_settled(kind, ident))
    calls, fired = inj.calls, inj.fired
    inj.arm(0)
    known = kind == "job" or _done(runner.commands.journal, ident, 0)
    out = {"settled": settled(kind, ident), "known": known, "calls": calls, "fired": fired,
           "faults": runner.memory_faults - before[0], "timeouts": stats["timeouts"] - before[1],
           "connects": stats["connects"] - before[2], "no_answer": stats["no_answer"] - before[3],
           "lost": runner.client.transport.lost_count - before[4],
           "ms": time.ticks_diff(time.ticks_ms(), t0)}
    print("DONE " + json.dumps(out))
