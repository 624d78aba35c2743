"""The seed's client (ws-mqtt-proxy-case-study.md, section 4.3), made to stop by itself.

paho-mqtt over WebSocket publishes "Payload N" to `iot` at 100 msg/s (QoS 1) for SECONDS
through the edge while a second paho client, subscribed over the edge too, counts what
arrives. Exit 0 when every message arrived and neither client ever disconnected.

    python seed_client.py HOST PORT SECONDS 3.1.1|5
"""

import sys
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.client import CallbackAPIVersion

host, port, seconds, version = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
protocol = mqtt.MQTTv311 if version == "3.1.1" else mqtt.MQTTv5
received = []
disconnects = []
topic = f"iot/{uuid.uuid4().hex[:6]}"


def client(name, on_message=None):
    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"{name}-{uuid.uuid4().hex[:4]}",
        transport="websockets",
        protocol=protocol,
    )
    c.ws_set_options(path="/mqtt", headers={"Sec-WebSocket-Protocol": "mqtt"})
    c.on_disconnect = lambda *args: disconnects.append(name)
    if on_message:
        c.on_message = on_message
    # A short keep-alive, so that MQTT's own pings cross the edge during the run.
    c.connect(host, port, keepalive=5)
    c.loop_start()
    return c


subscriber = client("sub", lambda c, userdata, m: received.append(m.payload))
subscriber.subscribe(topic, qos=1)
publisher = client("bench")
deadline = time.time() + 5
while not (publisher.is_connected() and subscriber.is_connected()) and time.time() < deadline:
    time.sleep(0.01)
time.sleep(0.2)
start, sent = time.time(), 0
while time.time() - start < seconds:
    if publisher.is_connected():
        sent += 1
        publisher.publish(topic, f"Payload {sent}", qos=1)
    time.sleep(0.01)
deadline = time.time() + 5
while len(received) < sent and time.time() < deadline:
    time.sleep(0.05)
in_order = received == [f"Payload {i}".encode() for i in range(1, sent + 1)]
ok = sent > 0 and in_order and not disconnects
print(
    f"paho MQTT {version} over WebSocket: sent {sent} in {seconds:g} s, "
    f"received {len(received)} (in order: {in_order}), disconnects {len(disconnects)}"
)
publisher.disconnect()
subscriber.disconnect()
sys.exit(0 if ok else 1)
