# Run by host_tests/test_ecdsa.py under the unix port: verify every case of a JSON file through
# iotjobs.ecdsa and print one line per case: "CASE <id> <0|1> <microseconds>", then "DONE <n>".
# The file holds one JSON object per line (read line by line: a list of thousands of cases would
# not fit the 32 KB heap the test runs this with). Case fields (hex unless noted): "id", "key"
# (or "pem": text), "sig", and "msg" and/or "digest" (both or neither: verify must say False).
# The file name comes as argv[1]: the unix port crashes on a command-line argument longer than
# about 256 characters (FATAL: uncaught NLR).
import sys
import json
import time
import gc
from binascii import unhexlify
from iotjobs.ecdsa import verify

n = 0
f = open(sys.argv[1])
while True:
    line = f.readline()
    if not line:
        break
    c = json.loads(line)
    line = None
    key = c["pem"] if "pem" in c else unhexlify(c["key"])
    sig = unhexlify(c["sig"])
    msg = unhexlify(c["msg"]) if "msg" in c else None
    dig = unhexlify(c["digest"]) if "digest" in c else None
    gc.collect()
    t = time.ticks_us()
    ok = verify(key, sig, message=msg, digest=dig)
    dt = time.ticks_diff(time.ticks_us(), t)
    print("CASE", c["id"], 1 if ok else 0, dt)
    n += 1
    key = sig = msg = dig = c = None
f.close()
print("DONE", n)
