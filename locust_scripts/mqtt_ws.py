"""Alarm devices that publish their alarms themselves: MQTT over WebSocket through the edge.

The Locust twin of `lps load --mqtt-ws` (crates/lps/src/load.rs). Each user is a device with
its own paho-mqtt client (MQTT v5, transport "websockets", path from the URL, as the seed's
client in seed 003), connected through the edge (lps-edge, `ws://HOST:8000/mqtt`) to the NG
broker. In a closed loop it publishes an alarm at QoS 2 to `devices/message` (which
legacy-proxy-2's filter `+/message` takes) with the payload legacy-proxy-1 would publish:

    {"id": <phone>, "body": "Phone: <p>, Branch: <b>, Headnumber: 8023, TriggerTime: <t>",
     "request_id": <id>}

then waits 1 s. The alarm is acknowledged only by the PUBCOMP of its publish; a PUBREC with
a failure reason code (>= 0x80: the broker discarded it) is a failure even though the
handshake goes on (paho 2.2 sends PUBREL regardless), as is no PUBCOMP within
LPS_PUBLISH_TIMEOUT_SECS or a lost connection. A failed alarm keeps its id and is published
again after the wait, through the next URL. Locust reports `MQTT devices/message` (first
publish to PUBCOMP, retries included) and `devices/message (failed attempt)`.

    locust -f locust_scripts/mqtt_ws.py --headless -u 10 -r 10 -t 60s --stop-timeout 30

Environment:
    LPS_MQTT_WS              comma-separated WebSocket URLs in rotation order
                             (default ws://127.0.0.1:8000/mqtt, `lps up ng --edge`)
    LPS_LEDGER               client ledger (the format of `lps load`'s client_ledger.jsonl)
    LPS_WAIT_SECS            wait between alarms and between attempts (1)
    LPS_PUBLISH_TIMEOUT_SECS how long a publish waits for its PUBCOMP (10)
    LPS_SEED                 seed of the branch choice (42)
"""

import itertools
import json
import logging
import os
import random
import time
import urllib.parse
import uuid
from datetime import datetime, timezone

import gevent
import paho.mqtt.client as mqtt
from locust import User, constant, events, task
from locust.user.task import LOCUST_STATE_STOPPING
from paho.mqtt.client import CallbackAPIVersion

import lps_locust

TOPIC = "devices/message"
FAILED_ATTEMPT = TOPIC + " (failed attempt)"
DEFAULT_URL = "ws://127.0.0.1:8000/mqtt"

PHONES = ["015142611148", "01754937448", "016590943333"]
BRANCHES = [*range(2001, 2011), *range(2012, 2017)]

WAIT_S = lps_locust.env_float("LPS_WAIT_SECS", 1.0)
PUBLISH_TIMEOUT_S = lps_locust.env_float("LPS_PUBLISH_TIMEOUT_SECS", 10.0)
RNG = random.Random(lps_locust.env_int("LPS_SEED", 42))
RUN = uuid.uuid4().hex[:8]

LOGGER = logging.getLogger("MqttAlarmDevice")
LEDGER = lps_locust.Ledger(None)


@events.init.add_listener
def _open_ledger(environment, **_kwargs):
    global LEDGER
    LEDGER = lps_locust.Ledger(os.environ.get("LPS_LEDGER"))


@events.quit.add_listener
def _close_ledger(**_kwargs):
    LEDGER.close()


def urls() -> list[str]:
    value = os.environ.get("LPS_MQTT_WS") or DEFAULT_URL
    found = lps_locust.split_urls(value)
    for url in found:
        if urllib.parse.urlsplit(url).scheme not in ("ws", "wss"):
            raise SystemExit(f"error: LPS_MQTT_WS: {url!r} is not a ws:// or wss:// URL")
    if not found:
        raise SystemExit(f"error: no URL in LPS_MQTT_WS={value!r}")
    return found


class AttemptFailed(Exception):
    """One publish of an alarm failed; the alarm is published again."""


class DeviceClient(mqtt.Client):
    """paho's client, remembering refusals: paho 2.2 ignores the reason code of a PUBREC
    (and completes the handshake anyway), but a PUBREC reason >= 0x80 means the broker
    discarded the message."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.refused = {}

    def _handle_pubrec(self):
        # PUBREC (MQTT 5, section 3.5.2): packet identifier, then the reason code when the
        # remaining length exceeds 2.
        packet = self._in_packet["packet"]
        if len(packet) > 2 and packet[2] >= 0x80:
            self.refused[int.from_bytes(packet[0:2], "big")] = packet[2]
        return super()._handle_pubrec()


def connect(url: str, client_id: str) -> DeviceClient:
    """A connected device: MQTT v5 over WebSocket, a session the broker keeps 300 s."""
    parts = urllib.parse.urlsplit(url)
    client = DeviceClient(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        transport="websockets",
        protocol=mqtt.MQTTv5,
    )
    client.ws_set_options(path=parts.path or "/mqtt")
    if parts.scheme == "wss":
        client.tls_set()
    properties = mqtt.Properties(mqtt.PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 300
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    client.connect(parts.hostname, port, keepalive=30, clean_start=True, properties=properties)
    client.loop_start()
    deadline = time.monotonic() + 5
    while not client.is_connected():
        if time.monotonic() > deadline:
            client.loop_stop()
            raise ConnectionError(f"no CONNACK from {url} within 5 s")
        gevent.sleep(0.01)
    return client


class MqttAlarmDevice(User):
    """An alarm device on MQTT over WebSocket: publishes an alarm until completed, waits 1 s."""

    wait_time = constant(0)
    _numbers = itertools.count()

    def __init__(self, environment):
        super().__init__(environment)
        self.number = next(MqttAlarmDevice._numbers)
        self.phone = PHONES[self.number % len(PHONES)]
        self.urls = urls()
        self.clients = {}

    def on_stop(self):
        for client in self.clients.values():
            client.disconnect()
            client.loop_stop()

    def client(self, slot: int) -> DeviceClient:
        client = self.clients.get(slot)
        if client is None or not client.is_connected():
            if client is not None:
                client.loop_stop()
            client = connect(self.urls[slot], f"locust-device-{RUN}-{self.number}-{slot}")
            self.clients[slot] = client
        return client

    def payload(self, request_id: str) -> bytes:
        branch = RNG.choice(BRANCHES)
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = f"Phone: {self.phone}, Branch: {branch}, Headnumber: 8023, TriggerTime: {now}"
        message = {"id": self.phone, "body": body, "request_id": request_id}
        return json.dumps(message, separators=(",", ":")).encode()

    def publish(self, slot: int, payload: bytes) -> int:
        """One publish; the ledger status: 200 on PUBCOMP, 503 when refused, else raises."""
        client = self.client(slot)
        info = client.publish(TOPIC, payload, qos=2)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"publish failed: {mqtt.error_string(info.rc)}")
        deadline = time.monotonic() + PUBLISH_TIMEOUT_S
        while not info.is_published():
            if time.monotonic() > deadline or not client.is_connected():
                client.refused.pop(info.mid, None)
                raise TimeoutError(f"no PUBCOMP within {PUBLISH_TIMEOUT_S} s")
            gevent.sleep(0.002)
        reason = client.refused.pop(info.mid, None)
        return 200 if reason is None else 503

    @task
    def alarms(self):
        while self._state != LOCUST_STATE_STOPPING:
            self.alarm()
            gevent.sleep(WAIT_S)

    def alarm(self):
        request_id = lps_locust.request_id()
        payload = self.payload(request_id)
        first_send_us = lps_locust.now_us()
        started = time.perf_counter()
        attempts, slot, endpoints, last_status, success_us = 0, 0, [], 0, None
        try:
            while True:
                url = self.urls[slot % len(self.urls)]
                attempts += 1
                endpoints.append(url)
                attempt_started = time.perf_counter()
                try:
                    last_status = self.publish(slot % len(self.urls), payload)
                    if last_status == 200:
                        success_us = lps_locust.now_us()
                        self.environment.events.request.fire(
                            request_type="MQTT",
                            name=TOPIC,
                            response_time=(time.perf_counter() - started) * 1000,
                            response_length=len(payload),
                            exception=None,
                            context={"request_id": request_id, "attempts": attempts},
                        )
                        return
                    error = f"the broker refused the message (PUBREC reason >= 0x80) via {url}"
                except Exception as e:  # noqa: BLE001 - any failure means: publish it again
                    last_status = 0
                    error = f"{type(e).__name__}: {e} via {url}"
                self.environment.events.request.fire(
                    request_type="MQTT",
                    name=FAILED_ATTEMPT,
                    response_time=(time.perf_counter() - attempt_started) * 1000,
                    response_length=0,
                    exception=AttemptFailed(error),
                    context={"request_id": request_id, "attempts": attempts},
                )
                LOGGER.warning("(%s) attempt %d failed: %s", request_id, attempts, error)
                slot += 1
                gevent.sleep(WAIT_S)
        finally:
            LEDGER.write(
                lps_locust.record(
                    id=request_id,
                    kind="alarm",
                    user=self.number,
                    step=0,
                    first_send_us=first_send_us,
                    success_us=success_us,
                    attempts=attempts,
                    endpoints=endpoints,
                    last_status=last_status,
                )
            )
