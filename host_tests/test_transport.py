"""The MQTT transport against a real mosquitto: long-topic SUBSCRIBE, mutual TLS that verifies
the broker, and publishes from another client arriving on a >122-byte topic."""
import json
import os
import subprocess

import paho.mqtt.client as mqtt
import pytest

from conftest import MICROPYTHON, ROOT, stack

SCRIPT = os.path.join(ROOT, "host_tests", "scripts", "long_topic.py")


DEVICE_PATH = ".frozen:" + os.path.join(ROOT, "build", "mpy", "host")


@pytest.fixture(autouse=True)
def compiled():
    subprocess.run([os.path.join(ROOT, "tools", "build"), "--arch", "host"], check=True,
                   capture_output=True)


def args_file(args: dict, folder) -> str:
    """The script's arguments as a file in the test's folder (long argv crashes the unix port)."""
    path = os.path.join(str(folder), "args-%d.json" % len(os.listdir(str(folder))))
    with open(path, "w") as f:
        json.dump(args, f)
    return path


def run_device_script(args: dict, folder, heap: str = "64K", timeout: float = 30):
    return subprocess.run([MICROPYTHON, "-X", f"heapsize={heap}", SCRIPT, args_file(args, folder)],
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, MICROPYPATH=DEVICE_PATH))


def topic_of(n: int) -> str:
    base = "$aws/things/dev/jobs/"
    return base + "x" * (n - len(base) - len("/update/accepted")) + "/update/accepted"


@pytest.mark.parametrize("length", [122, 123, 200, 226])
def test_long_topic_subscribe_and_receive(mosquitto, length, tmp_path):
    topic = topic_of(length)
    assert len(topic) == length
    r = run_device_script({"port": mosquitto.port, "topic": topic, "expect": 1}, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUBSCRIBED {length}" in r.stdout
    assert f"GOT {length} from-device" in r.stdout


def test_message_from_another_client_on_200_byte_topic(mosquitto, tmp_path):
    """paho publishes to the 200-byte topic once the device has subscribed."""
    topic = topic_of(200)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-pub")
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    proc = subprocess.Popen(
        [MICROPYTHON, "-X", "heapsize=64K", SCRIPT,
         args_file({"port": mosquitto.port, "topic": topic, "expect": 2}, tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, MICROPYPATH=DEVICE_PATH))
    try:
        first = proc.stdout.readline()
        assert first.startswith("SUBSCRIBED 200"), first + proc.stderr.read()
        pub.publish(topic, b"from-paho", qos=1).wait_for_publish(5)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        pub.loop_stop()
        pub.disconnect()
    assert "GOT 200 from-device" in out and "GOT 200 from-paho" in out, out + err


def test_mutual_tls_verifies_the_broker(tmp_path, pki, procs):
    # A broker without the per-thing ACL, so the client may talk to itself on any topic.
    mosquitto = stack.Mosquitto(str(tmp_path / "open-broker"), pki, acl=False)
    procs.append(mosquitto)
    folder = pki.thing("tlsdev")
    ok = run_device_script({"port": mosquitto.tls_port, "topic": topic_of(200), "expect": 1,
                            "tls": folder, "hostname": "localhost"}, tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "GOT 200 from-device" in ok.stdout
    # A CA that did not sign the broker's certificate: the handshake must fail.
    from iotjobs_host.pki import PKI

    other = PKI(os.path.join(pki.folder, "other-ca"))
    bad = run_device_script({"port": mosquitto.tls_port, "topic": topic_of(200), "expect": 1,
                             "tls": folder, "ca": other.ca_der, "hostname": "localhost"},
                            tmp_path)
    assert bad.returncode == 1 and "CONNECT-FAILED" in bad.stdout, bad.stdout + bad.stderr
    # The right CA but the wrong host name: also refused.
    wrong = run_device_script({"port": mosquitto.tls_port, "topic": topic_of(200), "expect": 1,
                               "tls": folder, "hostname": "not-the-broker"}, tmp_path)
    assert wrong.returncode == 1 and "CONNECT-FAILED" in wrong.stdout, wrong.stdout + wrong.stderr


def test_client_without_certificate_is_refused(mosquitto, pki):
    """The TLS listener requires a client certificate (its CN is the thing's identity)."""
    import socket
    import ssl as pyssl

    ctx = pyssl.create_default_context(cafile=pki.ca_pem)
    raw = socket.create_connection(("127.0.0.1", mosquitto.tls_port), timeout=5)
    try:
        with pytest.raises((pyssl.SSLError, ConnectionError)) as refused:
            s = ctx.wrap_socket(raw, server_hostname="localhost")
            # TLS 1.3 reports the missing certificate after the handshake, on the first read.
            s.sendall(b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04nope")
            if s.recv(4) == b"":
                raise ConnectionError("closed by the broker")
        assert refused.value is not None
    finally:
        raw.close()
