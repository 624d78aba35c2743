"""The alarm-device workload of LPS (SPEC §6), as upstream's Locust scripts ran it.

Each user is an alarm device in a closed loop: it sends `POST /api/v1/simple` with

    {"phone": <fixed per user>, "branch": <random 2001-2010, 2012-2016>,
     "headnumber": "8023", "triggertime": <now, UTC>}

and a `Request-Id`, then waits 1 s. A request keeps its id across retries: on any failure
(no answer, or a status outside 2xx) the user waits 1 s and sends it again to the next entry
in the list (7081 -> 7082 -> 7083 -> 7081 ...), until it succeeds or the run ends
(`--stop-timeout` gives alarms in flight time to finish). The response time reported to
Locust, as request `POST /api/v1/simple`, is first send to success. Every failed attempt is
reported as a failure of `POST /api/v1/simple (failed attempt)` with the attempt's own time,
so a healthy topology shows 0 failures and a fault shows up per endpoint (upstream reported
only the successes).

Load shapes: failover load is `-u 1`; the performance steps are shapes.py
(`-f locustfile.py,shapes.py`); the background production load is background.py.

Environment:
    LPS_ENTRIES          comma-separated entry base URLs in rotation order (else --host, which
                         may be a comma-separated list too, else 127.0.0.1:7081-7083)
    USE_HTTP_2           1|true|yes: h2c with prior knowledge, else HTTP/1.1
    USE_RANDOM_ENDPOINT  1|true|yes: start each alarm at a random entry (as upstream)
    LPS_LEDGER           append one JSON line per finished alarm to this file (the format of
                         `lps load`'s client_ledger.jsonl)
    LPS_WAIT_SECS        wait between alarms and between attempts (1)
    LPS_SEED             seed of the branch choice (42, as upstream)
"""

import itertools
import json
import logging
import random
import time
from datetime import datetime, timezone

import gevent
from locust import User, constant, task
from locust.user.task import LOCUST_STATE_STOPPING

import lps_locust

ALARM_PATH = "/api/v1/simple"
FAILED_ATTEMPT = ALARM_PATH + " (failed attempt)"

# The three alarm devices and the branches of upstream's locustfile (2011 is not among them).
PHONES = ["015142611148", "01754937448", "016590943333"]
BRANCHES = [*range(2001, 2011), *range(2012, 2017)]

HTTP2 = lps_locust.env_flag("USE_HTTP_2")
RANDOM_ENDPOINT = lps_locust.env_flag("USE_RANDOM_ENDPOINT")
WAIT_S = lps_locust.env_float("LPS_WAIT_SECS", 1.0)
RNG = random.Random(lps_locust.env_int("LPS_SEED", 42))

LOGGER = logging.getLogger("AlarmDevice")
# httpx logs every request at INFO; Locust's own statistics say more.
logging.getLogger("httpx").setLevel(logging.WARNING)

# Built once per process; greenlets share its pool (h2c: one multiplexed connection per entry).
SESSION = lps_locust.Session(HTTP2)


class AttemptFailed(Exception):
    """One attempt of an alarm failed; the alarm is sent again."""


class AlarmDevice(User):
    """An alarm device: sends an alarm, repeats it until it was acknowledged, waits 1 s."""

    # The device waits inside its task (see `alarms`), so Locust's own wait is none.
    wait_time = constant(0)
    _numbers = itertools.count()

    def __init__(self, environment):
        super().__init__(environment)
        self.number = next(AlarmDevice._numbers)
        # Fixed per user; users take the three phones in turn, as `lps load` does.
        self.phone = PHONES[self.number % len(PHONES)]
        self.entries = lps_locust.entries(self.host)

    def alarm_body(self) -> str:
        return json.dumps(
            {
                "phone": self.phone,
                "branch": str(RNG.choice(BRANCHES)),
                "headnumber": "8023",
                "triggertime": datetime.now(timezone.utc).strftime(
                    "%Y-%m-%dT%H:%M:%S.%fZ"
                ),
            },
            separators=(",", ":"),
        )

    @task
    def alarms(self):
        """Alarm, wait, alarm, ... until Locust asks the user to stop.

        The wait is not Locust's: Locust kills a user that it finds waiting at once, and a
        user whose wait ends in that moment is killed in the middle of its next alarm, which
        --stop-timeout should have let finish. Here Locust only ever finds the user running,
        so it asks it to stop, and the user stops after the current alarm and wait.
        """
        while self._state != LOCUST_STATE_STOPPING:
            self.alarm()
            gevent.sleep(WAIT_S)

    def alarm(self):
        """One alarm, sent until acknowledged; recorded in the ledger."""
        request_id = lps_locust.request_id()
        # The performance shape (shapes.py) attributes alarms to the step they started in.
        shape = self.environment.shape_class
        step = getattr(shape, "current_step", 0)
        if hasattr(shape, "alarm_started"):
            shape.alarm_started(step, request_id)

        body = self.alarm_body()
        headers = {"Request-Id": request_id, "Content-Type": "application/json"}
        index = RNG.randrange(len(self.entries)) if RANDOM_ENDPOINT else 0
        first_send_us = lps_locust.now_us()
        started = time.perf_counter()
        attempts = 0
        endpoints = []
        last_status = 0
        http_version = None
        success_us = None
        try:
            while True:
                base = self.entries[index % len(self.entries)]
                attempts += 1
                endpoints.append(base)
                attempt_started = time.perf_counter()
                try:
                    response = SESSION.client.post(base + ALARM_PATH, content=body, headers=headers)
                    last_status = response.status_code
                    http_version = response.http_version
                    if 200 <= response.status_code < 300:
                        success_us = lps_locust.now_us()
                        self.environment.events.request.fire(
                            request_type="POST",
                            name=ALARM_PATH,
                            response_time=(time.perf_counter() - started) * 1000,
                            response_length=len(response.content),
                            exception=None,
                            context={"request_id": request_id, "step": step, "attempts": attempts},
                        )
                        return
                    error = f"HTTP {response.status_code} from {base}"
                except Exception as e:  # noqa: BLE001 - any failure means: send it again
                    last_status = 0
                    error = f"{type(e).__name__} from {base}"
                self.environment.events.request.fire(
                    request_type="POST",
                    name=FAILED_ATTEMPT,
                    response_time=(time.perf_counter() - attempt_started) * 1000,
                    response_length=0,
                    exception=AttemptFailed(error),
                    context={"request_id": request_id, "step": step, "attempts": attempts},
                )
                LOGGER.warning(
                    "(%s) attempt %d failed: %s; sending to the next entry in %.0f s",
                    request_id,
                    attempts,
                    error,
                    WAIT_S,
                )
                index += 1
                # Not self.wait(): a user asked to stop must finish the alarm it is sending,
                # within --stop-timeout.
                gevent.sleep(WAIT_S)
        finally:
            # Also when the user is killed mid-alarm (the run ended): then it is `failed`.
            line = lps_locust.record(
                id=request_id,
                kind="alarm",
                user=self.number,
                step=step,
                first_send_us=first_send_us,
                success_us=success_us,
                attempts=attempts,
                endpoints=endpoints,
                last_status=last_status,
            )
            # Beyond ClientRecord: the protocol of the last answer (`HTTP/1.1`, `HTTP/2`).
            line["http_version"] = http_version
            SESSION.ledger.write(line)
