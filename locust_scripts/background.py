"""The background production load of LPS (SPEC §6): other legacy clients that keep the
simulator (ars-comp-3) busy while the alarms run.

    locust -f background.py --headless -u 70 -r 70

Each user sends one request per second, `POST /<COMMAND>` with a random non-alarm legacy
command and the body `{}`, straight to the simulator, without a Request-Id (the simulator
then logs a random UUID) and without retries. Upstream ran 70 such users. Over HTTP/1.1
always: the legacy backend speaks nothing else.

Environment:
    LPS_SIMULATOR   simulator base URL (else --host, else 127.0.0.1:8084, compose's port)
    LPS_LEDGER      append one JSON line per request (ClientRecord, kind `background`)
    LPS_SEED        seed of the command choice (42)
"""

import itertools
import logging
import os
import random
import time

from locust import User, constant_pacing, task

import lps_locust

# The simulator's commands except the alarm command ID_REQ_KC_STORE7D3BPACKET, in the order
# of crates/rast-simulator/src/commands.rs (COMMANDS; kept equal by the lps locust test).
BACKGROUND_COMMANDS = [
    "ID_REQ_KC_LOGIN",
    "ID_REQ_KC_LOGOUT",
    "ID_REQ_KC_HEARTBEAT",
    "ID_REQ_KC_GETSTATUS",
    "ID_REQ_KC_GETCONFIG",
    "ID_REQ_KC_SETCONFIG",
    "ID_REQ_KC_GETEVENTS",
    "ID_REQ_KC_ACKEVENT",
    "ID_REQ_KC_STOREPACKET",
    "ID_REQ_KC_GETDEVICE",
    "ID_REQ_KC_SETDEVICE",
    "ID_REQ_KC_GETBRANCH",
    "ID_REQ_KC_GETHISTORY",
    "ID_REQ_KC_CLEARALARM",
    "ID_REQ_KC_TESTALARM",
    "ID_REQ_KC_GETUSERS",
    "ID_REQ_KC_SYNCTIME",
]

RNG = random.Random(lps_locust.env_int("LPS_SEED", 42))
logging.getLogger("httpx").setLevel(logging.WARNING)

SESSION = lps_locust.Session(http2=False)


class CommandFailed(Exception):
    """The simulator did not answer 2xx."""


class BackgroundProduction(User):
    """A legacy client: one random non-alarm command per second, no retry."""

    wait_time = constant_pacing(1)
    _numbers = itertools.count()

    def __init__(self, environment):
        super().__init__(environment)
        self.number = next(BackgroundProduction._numbers)
        urls = lps_locust.split_urls(
            os.environ.get("LPS_SIMULATOR") or self.host or lps_locust.DEFAULT_SIMULATOR
        )
        if not urls:
            raise SystemExit("error: LPS_SIMULATOR names no URL")
        self.simulator = urls[0]

    @task
    def command(self):
        command = RNG.choice(BACKGROUND_COMMANDS)
        first_send_us = lps_locust.now_us()
        started = time.perf_counter()
        status = 0
        length = 0
        exception = None
        try:
            response = SESSION.client.post(f"{self.simulator}/{command}", content=b"{}")
            status = response.status_code
            length = len(response.content)
            if not 200 <= status < 300:
                exception = CommandFailed(f"HTTP {status}")
        except Exception as e:  # noqa: BLE001 - reported to Locust, not retried
            exception = CommandFailed(type(e).__name__)
        self.environment.events.request.fire(
            request_type="POST",
            name=f"/{command}",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=exception,
            context={},
        )
        SESSION.ledger.write(
            lps_locust.record(
                id="",
                kind="background",
                user=self.number,
                step=0,
                first_send_us=first_send_us,
                success_us=None if exception else lps_locust.now_us(),
                attempts=1,
                endpoints=[self.simulator],
                last_status=status,
            )
        )
