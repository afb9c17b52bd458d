"""paho-mqtt 2.2.0's `Client.loop_stop()` races its own network thread: after `disconnect()`
the thread may end and set `_thread = None` between loop_stop's check and its `join()`, which
then raises AttributeError ('NoneType' object has no attribute 'join'). Seen in the test suite
under load. `loop_stop(client)` does the same without the race; `patch()` installs it as the
method for every client (the tests do, so their helpers need no change)."""
from __future__ import annotations

import threading
from typing import Any


def loop_stop(client: Any) -> Any:
    from paho.mqtt.client import MQTTErrorCode

    thread = client._thread  # read once: the network thread may clear it at any moment
    if thread is None:
        return MQTTErrorCode.MQTT_ERR_INVAL
    client._thread_terminate = True
    if threading.current_thread() is not thread:
        thread.join()
    return MQTTErrorCode.MQTT_ERR_SUCCESS


def patch() -> None:
    import paho.mqtt.client as mqtt

    mqtt.Client.loop_stop = loop_stop  # type: ignore[method-assign]
