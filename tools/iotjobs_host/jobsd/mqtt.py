"""The MQTT side of jobsd: the Jobs device API over a broker, as AWS IoT Core serves it.

`answer()` is the pure part: topic and payload in, reply topic and payload out, nothing raised.
`MqttBridge` is the paho plumbing around it: one connection (client id `jobsd`) that
subscribes to `$aws/things/+/jobs/#`, to the AWS IoT commands response topic
`$aws/commands/+/+/executions/+/response/json` and to the streams requests
`$aws/things/+/streams/#`, feeds requests to `answer()` (`answer_stream()` for streams),
publishes replies and the service's events at QoS 1 (stream `data` at QoS 0, streams.py), and
reconnects and resubscribes when the broker goes away.

A commands report is answered on `.../response/accepted/json` with `{"executionId": E}` or on
`.../response/rejected/json` with `{"error", "errorMessage", "executionId"}`: other member
names than the jobs rejections, and no clientToken (PROTOCOL.md 1.11, A12). Only JSON reports
are served; `.../response/cbor` is not subscribed.

The subscription is No Local (MQTT 5), so the broker does not echo jobsd's own replies and
events; reply and event topics published by anyone else (a device forging `.../accepted`) are
responses, not requests, and are dropped, so jobsd never answers them.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any, Optional

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from .. import pahofix
from . import commands as cmds
from . import streams as sts
from . import views
from .rules import (NEXT, DeviceError, check_client_token, parse_json, parse_describe, parse_start_next,
                    parse_update, valid_job_id, valid_thing_name)
from .service import Delivery, Service, encode

log = logging.getLogger("jobsd.mqtt")

SUBSCRIPTIONS = ("$aws/things/+/jobs/#", cmds.RESPONSE_SUBSCRIPTION, sts.SUBSCRIPTION)
MAX_INFLIGHT = 0  # paho: 0 = no limit (a limit makes every PUBACK scan all in-flight messages)

# Request kinds a topic can name.
GET_PENDING = "get"
START_NEXT = "start-next"
DESCRIBE = "describe"
UPDATE = "update"
INVALID = "invalid"


def route(topic: str) -> Optional[tuple[str, str, Optional[str]]]:
    """Map a jobs topic to (kind, thing, job id); None for topics that are not requests.

    Never raises: a foreign or malformed topic is either ignored or an InvalidTopic request.
    """
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != "$aws" or parts[1] != "things" or parts[3] != "jobs":
        return None
    thing, rest = parts[2], parts[4:]
    if rest and rest[-1] in ("accepted", "rejected"):
        return None  # responses (ours, or a device publishing where it should not)
    if rest in (["notify"], ["notify-next"]) or any(
            part.startswith("notify-namespace-") for part in rest):
        return None  # events, including the Greengrass `<J>/notify-namespace-<NS>/` form
    if not valid_thing_name(thing):
        return (INVALID, thing, None)
    if rest == ["get"]:
        return (GET_PENDING, thing, None)
    if rest == ["start-next"]:
        return (START_NEXT, thing, None)
    if len(rest) == 2 and rest[1] == "get" and (rest[0] == NEXT or valid_job_id(rest[0])):
        return (DESCRIBE, thing, rest[0])
    if len(rest) == 2 and rest[1] == "update" and valid_job_id(rest[0]):
        return (UPDATE, thing, rest[0])
    return (INVALID, thing, None)


def answer(service: Service, topic: str, payload: bytes) -> Optional[tuple[str, bytes]]:
    """Handle one request; return the reply to publish, or None when the topic is no request."""
    if topic.startswith("$aws/commands/"):
        return answer_command(service, topic, payload)
    target = route(topic)
    if target is None:
        return None
    kind, thing, job_id = target
    token: Optional[str] = None
    try:
        try:
            body: Any = parse_json(payload, surrogates=True)
        except ValueError:  # UnicodeDecodeError is a ValueError
            body = None
        if isinstance(body, dict) and isinstance(body.get("clientToken"), str):
            token = body["clientToken"]  # echoed in every reply, rejections included
        if kind == INVALID:
            raise DeviceError("InvalidTopic", f"Topic {topic} does not name a jobs API")
        if body is None:
            raise DeviceError("InvalidJson", "Payload is not valid UTF-8 JSON")
        if not isinstance(body, dict):
            raise DeviceError("InvalidRequest", "Payload must be a JSON object")
        head: dict[str, Any] = {} if token is None else {"clientToken": token}
        return topic + "/accepted", _dispatch(service, kind, thing, job_id, body, head)
    except DeviceError as err:
        return topic + "/rejected", encode(_rejection(service, err, token))
    except Exception:  # never let one bad request take the bridge down
        log.exception("internal error answering %s", topic)
        err = DeviceError("InternalError", "Internal error")
        return topic + "/rejected", encode(_rejection(service, err, token))


def answer_stream(service: Service, topic: str, payload: bytes
                  ) -> list[tuple[str, bytes, int]]:
    """DescribeStream and GetStream (STREAMS.md 2-4): the messages to publish as (topic,
    payload, QoS): one `description`, one `data` per block, or one `rejected`. Nothing for
    topics that are not stream requests. Never raises."""
    target = sts.route(topic)
    if target is None or service.stream_fault == "Silent":  # the test hook: say nothing
        return []
    fmt = target.reply_fmt
    token: Optional[str] = None
    try:
        if not target.valid:
            raise sts.StreamError("InvalidTopic", f"Topic {topic} does not name a stream API")
        body = sts.decode(payload, fmt)
        if target.verb == sts.DESCRIBE:
            token = sts.parse_describe(body)
            version, description, files = service.stream_describe(target.stream_id, token)
            return [(target.topic("description"),
                     sts.description(fmt, token, version, description, files), sts.QOS_REPLY)]
        req = sts.parse_get(body, fmt)
        token = req.token
        indexes, data = service.stream_blocks(target.stream_id, req)
        encoder = sts.DataEncoder(fmt, token, req.file_id)
        block = req.block_size
        topic_out = target.topic("data")
        return [(topic_out, encoder.message(i, data[i * block:(i + 1) * block]), sts.QOS_DATA)
                for i in indexes]
    except sts.StreamError as err:
        return [(target.topic("rejected"), sts.rejection(fmt, err.code, err.message, err.token),
                 sts.QOS_REPLY)]
    except Exception:  # never let one bad request take the bridge down
        log.exception("internal error answering %s", topic)
        return [(target.topic("rejected"),
                 sts.rejection(fmt, "InternalError", "Internal error", token), sts.QOS_REPLY)]


def answer_command(service: Service, topic: str, payload: bytes) -> Optional[tuple[str, bytes]]:
    """UpdateCommandExecution: a device's report on `.../executions/<E>/response/json`."""
    target = cmds.route_response(topic)
    if target is None:
        return None
    kind, name, execution_id = target
    base = topic[:-len("/json")]  # .../executions/<E>/response
    try:
        if not kind or not cmds.valid_target_name(name) or not cmds.valid_id(execution_id):
            raise DeviceError("InvalidTopic", f"Topic {topic} does not name a command execution")
        try:
            body: Any = parse_json(payload)
        except ValueError:
            raise DeviceError("InvalidJson", "Payload is not valid UTF-8 JSON") from None
        service.update_command_execution(kind, name, execution_id, cmds.parse_update(body))
        return base + "/accepted/json", encode({"executionId": execution_id})
    except DeviceError as err:
        return base + "/rejected/json", encode({"error": err.code, "errorMessage": err.message,
                                                 "executionId": execution_id})
    except Exception:  # never let one bad report take the bridge down
        log.exception("internal error answering %s", topic)
        return base + "/rejected/json", encode({"error": "InternalError",
                                                 "errorMessage": "Internal error",
                                                 "executionId": execution_id})


def _rejection(service: Service, err: DeviceError, token: Optional[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"code": err.code, "message": err.message}
    if token is not None:
        out["clientToken"] = token
    out["timestamp"] = service.now()
    if err.state is not None and err.code in ("InvalidStateTransition", "VersionMismatch"):
        out["executionState"] = views.execution_state(err.state)
    return out


def _dispatch(service: Service, kind: str, thing: str, job_id: Optional[str],
              body: dict[str, Any], head: dict[str, Any]) -> bytes:
    """The accepted payload; `head` holds the echoed clientToken (first, as AWS orders it)."""
    if kind == GET_PENDING:
        check_client_token(body)  # GetPendingJobExecutions has no other member
        in_progress, queued = service.get_pending(thing)
        return encode({**head, "timestamp": service.now(),
                       "inProgressJobs": [views.summary(ex) for ex in in_progress],
                       "queuedJobs": [views.summary(ex) for ex in queued]})
    if kind == START_NEXT:
        started = service.start_next(thing, parse_start_next(body))
        head["timestamp"] = service.now()
        if started is None:
            return encode(head)
        return views.execution_message(head, started[0], started[1])
    assert job_id is not None
    if kind == DESCRIBE:
        req = parse_describe(body)
        found = service.describe(thing, job_id, req)
        head["timestamp"] = service.now()
        if found is None:
            return encode(head)
        return views.execution_message(head, found[0],
                                       found[1] if req.include_document else None)
    req_u = parse_update(body)
    ex, document = service.update(thing, job_id, req_u)
    out = {**head, "timestamp": service.now()}
    if req_u.include_state:
        out["executionState"] = views.execution_state(ex)
    if req_u.include_document:
        out["jobDocument"] = views.document_object(document)
    return encode(out)


def _no_delay(_client: paho.Client, _userdata: Any, sock: Any) -> None:
    """Replies and events go out as several small packets in a row; without TCP_NODELAY each
    waits for the broker's delayed ACK (about 40 ms on loopback)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not a TCP socket (e.g. a websocket wrapper): nothing to tune


class MqttBridge:
    """One paho connection carrying requests in and replies and events out.

    MQTT 5, so the subscription can set No Local: the broker does not send jobsd's own replies
    and events back to it (with `#` they would otherwise double its inbound traffic). Publishes
    are QoS 1 and never waited for; the in-flight window is large so a burst of replies is not
    held back behind PUBACKs of earlier ones.
    """

    def __init__(self, service: Service, host: str, port: int, client_id: str = "jobsd",
                 keepalive: int = 30) -> None:
        self._service = service
        self._host, self._port, self._keepalive = host, port, keepalive
        self.subscribed = threading.Event()
        self._stopping = False
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=paho.MQTTv5)
        self._client.reconnect_delay_set(min_delay=0.25, max_delay=5)  # type: ignore[arg-type]
        self._client.max_inflight_messages_set(MAX_INFLIGHT)
        self._client.max_queued_messages_set(0)  # unbounded while disconnected
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_socket_open = _no_delay

    def start(self) -> None:
        self._client.connect_async(self._host, self._port, keepalive=self._keepalive,
                                   clean_start=True)
        self._client.loop_start()  # its thread retries the first connection and reconnects

    def stop(self) -> None:
        self._stopping = True
        self._client.disconnect()
        pahofix.loop_stop(self._client)

    def publish(self, topic: str, payload: bytes, delivery: Optional[Delivery] = None,
                qos: int = 1) -> None:
        properties = None
        if delivery is not None:  # a command request: MQTT 5 content type and expiry
            properties = Properties(PacketTypes.PUBLISH)
            if delivery.content_type:
                properties.ContentType = delivery.content_type
            properties.MessageExpiryInterval = delivery.expiry_seconds
        info = self._client.publish(topic, payload, qos=qos, properties=properties)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            log.warning("publish to %s queued while disconnected (rc=%s)", topic, info.rc)

    # -- paho callbacks (network thread) -------------------------------------------------------
    def _on_connect(self, client: paho.Client, _userdata: Any, _flags: Any, reason: Any,
                    _props: Any) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason)
            return
        log.info("connected to %s:%d, subscribing %s", self._host, self._port,
                 " and ".join(SUBSCRIPTIONS))
        client.subscribe([(topic, SubscribeOptions(qos=1, noLocal=True))
                          for topic in SUBSCRIPTIONS])

    def _on_disconnect(self, _client: paho.Client, _userdata: Any, _flags: Any, reason: Any,
                       _props: Any) -> None:
        self.subscribed.clear()
        if self._stopping:
            log.info("disconnected from broker")
        else:
            log.warning("disconnected from broker: %s", reason)

    def _on_subscribe(self, _client: paho.Client, _userdata: Any, _mid: int, reasons: Any,
                      _props: Any) -> None:
        if any(r.is_failure for r in reasons):
            log.error("broker refused the subscriptions %s: %s", SUBSCRIPTIONS, reasons)
            return
        self.subscribed.set()

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        if sts.is_stream_topic(msg.topic):
            for topic, payload, qos in answer_stream(self._service, msg.topic, msg.payload):
                self.publish(topic, payload, qos=qos)
            return
        try:
            reply = answer(self._service, msg.topic, msg.payload)
        except Exception:  # answer() already guards; this is the last line of defence
            log.exception("dropping message on %s", msg.topic)
            return
        if reply is not None:
            log.debug("%s -> %s", msg.topic, reply[0])
            self.publish(*reply)
