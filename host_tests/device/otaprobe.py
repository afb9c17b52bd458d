# Test firmware for host_tests/test_bootloader.py, put on the simulated device's filesystem as
# main.py (it then runs instead of the frozen app, as on a board). At each boot it prints its
# OTA state, then obeys commands the host drops into the flash folder as cmd.json (written to
# a temporary name and renamed), one at a time:
#   {"n": 1, "op": "state"}
#   {"n": 2, "op": "flash", "file": "img.bin", "blocks": null}  image file -> next slot, set_boot
#                                                              ("blocks": k stops after k blocks)
#   {"n": 3, "op": "confirm"}                 Partition.mark_app_valid_cancel_rollback()
#   {"n": 4, "op": "reset"}                   board.reset()
# Each answer is a line "@@DONE n {json}"; a command that raises answers {"error": [errno...]}.
import json
import os
import time

import iotjobs_board as board

Partition = board.partition_class()


def state():
    st = board.ota_state()
    st["boot"] = Partition(Partition.BOOT).info()[4]
    st["next"] = Partition(Partition.RUNNING).get_next_update().info()[4]
    return st


def flash(name, blocks=None):
    part = Partition(Partition.RUNNING).get_next_update()
    buf = bytearray(4096)
    block = 0
    with open(name, "rb") as f:
        while blocks is None or block < blocks:
            n = f.readinto(buf)
            if not n:
                break
            for i in range(n, len(buf)):
                buf[i] = 0xFF
            part.writeblocks(block, buf)
            block += 1
    if blocks is not None:
        return {"written": block}
    part.set_boot()
    return {"written": block, "boot": Partition(Partition.BOOT).info()[4]}


def run(cmd):
    op = cmd["op"]
    if op == "state":
        return state()
    if op == "flash":
        return flash(cmd["file"], cmd.get("blocks"))
    if op == "confirm":
        Partition.mark_app_valid_cancel_rollback()
        return state()
    if op == "reset":
        print("@@DONE %d {}" % cmd["n"])
        board.reset()
    raise ValueError(op)


print("@@BOOT " + json.dumps(state()))
while True:
    try:
        with open("cmd.json") as f:
            cmd = json.load(f)
    except OSError:
        time.sleep_ms(10)
        continue
    os.remove("cmd.json")
    try:
        out = run(cmd)
    except OSError as e:
        out = {"error": list(e.args)}
    print("@@DONE %d %s" % (cmd["n"], json.dumps(out)))
