# Run by host_tests/test_transport.py under the unix port: connect through iotjobs.transport
# (plain or mutual TLS), subscribe to a long topic, publish to it, print what came back.
import sys
import json
from iotjobs.transport import Transport

# Arguments come in a JSON file: the unix port crashes on a command-line argument longer than
# about 256 characters (FATAL: uncaught NLR).
with open(sys.argv[1]) as f:
    args = json.load(f)
ctx = None
if args.get("tls"):
    import ssl

    def read(p):
        with open(p, "rb") as f:
            return f.read()

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(read(args["tls"] + "/cert.der"), read(args["tls"] + "/key.der"))
    ctx.load_verify_locations(cadata=read(args.get("ca") or args["tls"] + "/ca.der"))
got = []
t = Transport(b"longtopic", "127.0.0.1", args["port"], ssl=ctx, server_hostname=args.get("hostname"), timeout=5)
t.set_callback(lambda topic, msg: got.append((topic, msg)))
try:
    t.connect()
except OSError as e:
    print("CONNECT-FAILED", repr(e))
    sys.exit(1)
topic = args["topic"].encode()
t.subscribe(topic, 1)
print("SUBSCRIBED", len(topic))
t.publish(topic, b"from-device", qos=1)
while len(got) < args["expect"]:
    if t.wait(5000) is None:
        break
for topic_in, msg in got:
    print("GOT", len(topic_in), msg.decode())
t.disconnect()
