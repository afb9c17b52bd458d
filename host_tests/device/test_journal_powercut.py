# Power cuts during a job's whole journal traffic on littlefs. A clean run first counts the
# flash operations (programs + erases) W; then for every cut point 1..W, torn or not written,
# the same traffic runs on a fresh copy of the same formatted chip until the power goes, the
# surviving bytes are mounted on a new chip, and the journal found there must be exactly the
# state before or after the transition that was cut (never a mix, never garbage), and must be
# able to carry the job on to the same final state.
import json
import os
from flashsim import Flash, TORN, NONE, MOUNT
from iotjobs import journal as J

PATH = MOUNT + "/journal.json"
CONFIG = b'{"thing": "dev-0001", "broker": "127.0.0.1:1883", "heap": "64K"}'

# one job's traffic: boot, start, two checkpoints (the second one before a reboot), the
# terminal status into the outbox, the service's acknowledgement
def job_steps(job_id, number):
    return [
        ("start " + job_id, lambda j: j.start(job_id, number, 1)),
        ("checkpoint 1", lambda j: j.checkpoint(1, {"off": 65536, "sha": "9f86d081884c7d65"})),
        ("checkpoint 2", lambda j: j.checkpoint(2, {"slot": "ota_1", "size": 1310720},
                                                J.REBOOT)),
        ("finish", lambda j: j.finish("SUCCEEDED", {"reason": "ok", "fw": "1.4.2"}, 4)),
        ("acknowledged", lambda j: j.acknowledged()),
    ]


def traffic(jobs):
    steps = [("booted", lambda j: j.booted())]
    for k in range(jobs):
        steps += job_steps("fw-update-%04d" % k, 3 + k)
    return steps


STEPS = traffic(1)
# enough jobs that littlefs compacts the metadata block holding the journal at least once
LONG = traffic(8)

# a device that has already run jobs: the done list is not empty
HISTORY = ["ota-a:1:SUCCEEDED", "reboot-b:1:SUCCEEDED", "dl-c:2:FAILED"]


def state(j):
    """A deep copy of the journal's durable state, comparable with ==."""
    return json.loads(json.dumps([j.boot, j.job, j.out, j.done]))


_images = {}


def base_image(history):
    """A formatted chip with the device's config file (and a prior journal, if history)."""
    key = len(history)
    if key not in _images:
        f = Flash()
        f.format()
        f.mount()
        with open(MOUNT + "/config.json", "wb") as fh:
            fh.write(CONFIG)
        if history:
            j = J.Journal(PATH)
            j.boot = 7
            j.done = list(history)
            j.save()
        f.unmount()
        _images[key] = f.snapshot()
    return _images[key]


def clean_run(history, steps):
    """The states the traffic passes through and the op count at the end of each step."""
    f = Flash(data=bytearray(base_image(history)))
    f.mount()
    f.reset_counts()
    j = J.Journal(PATH)
    states = [state(j)]
    marks = [0]
    for _, step in steps:
        step(j)
        states.append(state(j))
        marks.append(f.ops)
    f.unmount()
    return states, marks, f


def step_of(marks, n):
    """Index of the step whose flash operations include operation n."""
    for k in range(1, len(marks)):
        if n <= marks[k]:
            return k - 1
    raise AssertionError("cut point %d beyond the traffic" % n)


def cut_run(history, steps, states, marks, n, style):
    """Cut at operation n; return (step index cut, index of the state found afterwards)."""
    f = Flash(data=bytearray(base_image(history)))
    f.mount()
    f.reset_counts()
    j = J.Journal(PATH)
    f.cut_at(n, style)
    cut = None
    for k in range(len(steps)):
        try:
            steps[k][1](j)
        except OSError as e:
            assert e.errno == 5, (n, style, e)
            cut = k
            break
    assert cut is not None, ("no failure at cut point", n, style)
    assert f.dead
    assert cut == step_of(marks, n), (n, style, cut, marks)

    # power back on: mount what survived, load, and carry on from there
    g = f.survivor()
    g.mount()
    logs = []
    j2 = J.Journal(PATH, logs.append)
    found = state(j2)
    assert found in (states[cut], states[cut + 1]), (n, style, steps[cut][0], found, logs)
    i = cut + 1 if found == states[cut + 1] else cut
    if i == 0 and not history:
        # the very first write never landed: the load finds no journal, a clean start
        assert logs == ["journal: no journal: clean start"], logs
    else:
        assert logs == [], (n, style, logs)  # a journal was there and it read cleanly
    for _, step in steps[i:]:
        step(j2)
    assert j2.writes == len(steps) - i
    assert state(j2) == states[-1], (n, style, state(j2))

    # what it wrote survives a further remount, and nothing left behind confuses it
    h = g.survivor()
    h.mount()
    assert state(J.Journal(PATH)) == states[-1]
    assert sorted(os.listdir(MOUNT)) == ["config.json", "journal.json"], os.listdir(MOUNT)
    with open(MOUNT + "/config.json", "rb") as fh:
        assert fh.read() == CONFIG  # the neighbour file is untouched
    h.unmount()
    return cut, i


def sweep(history, steps, style, first=1, last=None):
    """Every cut point first..last (default: all W) of the traffic; returns W."""
    states, marks, f = clean_run(history, steps)
    w = marks[-1]
    assert w == f.ops and w > len(steps)
    old = new = 0
    for n in range(first, min(w, last or w) + 1):
        cut, i = cut_run(history, steps, states, marks, n, style)
        if i == cut:
            old += 1
        else:
            new += 1
    print("cut style %s, history %d, %d steps: W=%d ops (%d programs, %d erases), per step %s; "
          "tried %d: old state %d, new state %d" % (
              style, len(history), len(steps), w, f.writes, f.erases,
              [marks[k + 1] - marks[k] for k in range(len(steps))], old + new, old, new))
    return w


def test_clean_run_states():
    states, marks, f = clean_run(HISTORY, STEPS)
    assert states[0] == [7, None, None, HISTORY]
    assert states[-1] == [8, None, None, HISTORY + ["fw-update-0000:3:SUCCEEDED"]]
    assert states[2][1] == {"id": "fw-update-0000", "n": 3, "v": 1, "step": 0, "cp": None,
                            "t": "RUN"}
    assert len(set(json.dumps(s) for s in states)) == len(states)  # every step changes the state
    # each transition costs a small, bounded number of flash operations (no compaction here)
    for k in range(len(STEPS)):
        assert 0 < marks[k + 1] - marks[k] <= 8, (STEPS[k][0], marks)


def test_long_traffic_compacts_metadata():
    """The long sweep is only meaningful if littlefs compacts the directory's metadata pair
    (blocks 0 and 1: erase one, rewrite the live entries into it) inside the traffic."""
    states, marks, f = clean_run(HISTORY, LONG)
    assert f.erased[0] + f.erased[1] >= 2, f.erased
    per = [marks[k + 1] - marks[k] for k in range(len(LONG))]
    assert max(per) <= 10, per  # a compaction costs a few operations more, not many
    assert states[-1][3] == (HISTORY + ["fw-update-%04d:%d:SUCCEEDED" % (k, 3 + k)
                                        for k in range(8)])[-J.DONE_MAX:]


def test_powercut_torn_fresh_chip():
    sweep([], STEPS, TORN)


def test_powercut_nowrite_fresh_chip():
    sweep([], STEPS, NONE)


def test_powercut_torn_with_history():
    sweep(HISTORY, STEPS, TORN)


def test_powercut_nowrite_with_history():
    sweep(HISTORY, STEPS, NONE)


def test_powercut_torn_long():
    sweep(HISTORY, LONG, TORN)


def test_powercut_nowrite_long():
    sweep(HISTORY, LONG, NONE)
