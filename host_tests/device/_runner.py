# Runs inside the MicroPython unix port: `_runner.py MODULE --list` prints "TEST name" for each
# test_* function; `_runner.py MODULE NAME` runs one and prints "RESULT {json}" with its
# traceback. One interpreter per test function keeps the tests independent.
import sys
import io
import json

mod_name = sys.argv[1]
mod = __import__(mod_name)
names = sorted(n for n in dir(mod) if n.startswith("test_") and callable(getattr(mod, n)))
if sys.argv[2] == "--list":
    for n in names:
        print("TEST " + n)
else:
    name = sys.argv[2]
    res = {"name": name, "ok": True, "traceback": ""}
    try:
        getattr(mod, name)()
    except BaseException as e:  # noqa: B036 - report everything, SystemExit included
        buf = io.StringIO()
        sys.print_exception(e, buf)
        res["ok"] = False
        res["traceback"] = buf.getvalue()
    print("RESULT " + json.dumps(res))
