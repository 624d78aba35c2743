"""The performance load of LPS (SPEC §6) as a Locust load shape, for locustfile.py:

    locust -f locustfile.py,shapes.py --headless --stop-timeout 60

Step k (1, 2, ...) runs 250·k alarm devices for 1 min, then a 1 min pause with no users in
which the alarms still in flight finish. After each pause the step's response times (first
send to success, as AlarmDevice reports them) are checked against the EN 50136 limits: the
run stops when a step's average exceeds 10 s or its maximum exceeds 30 s. An alarm of the
step that still has not been acknowledged counts with its age so far, a lower bound of its
response time. The run also stops after LPS_MAX_STEPS steps.

Environment (defaults are upstream's):
    LPS_STEP_USERS       users added per step (250)
    LPS_STEP_SECS        length of a step, seconds (60)
    LPS_PAUSE_SECS       pause after a step, seconds (60)
    LPS_MAX_STEPS        at most this many steps (10, as `lps load --steps`)
    LPS_LIMIT_AVG_SECS   average response time limit of a step (10)
    LPS_LIMIT_MAX_SECS   maximum response time limit of a step (30)

Without --stop-timeout, users are stopped immediately when a step ends; then the shape sets
it to the pause, so alarms in flight get the pause to finish.
"""

import logging
import time
from collections import defaultdict

from locust import LoadTestShape, events

import lps_locust

ALARM_PATH = "/api/v1/simple"

STEP_USERS = lps_locust.env_int("LPS_STEP_USERS", 250)
STEP_S = lps_locust.env_float("LPS_STEP_SECS", 60.0)
PAUSE_S = lps_locust.env_float("LPS_PAUSE_SECS", 60.0)
MAX_STEPS = lps_locust.env_int("LPS_MAX_STEPS", 10)
LIMIT_AVG_MS = lps_locust.env_float("LPS_LIMIT_AVG_SECS", 10.0) * 1000
LIMIT_MAX_MS = lps_locust.env_float("LPS_LIMIT_MAX_SECS", 30.0) * 1000

LOGGER = logging.getLogger("PerformanceSteps")


@events.init.add_listener
def _stop_timeout(environment, **_kwargs):
    if not environment.stop_timeout:
        environment.stop_timeout = PAUSE_S


class PerformanceSteps(LoadTestShape):
    """Steps of LPS_STEP_USERS·k users until the EN 50136 limits break."""

    def __init__(self):
        super().__init__()
        # The 0-based step alarms started now belong to (read by AlarmDevice).
        self.current_step = 0
        # Alarms not yet acknowledged: step -> request id -> start (perf_counter).
        self._in_flight = defaultdict(dict)
        # Response times of acknowledged alarms per step, ms.
        self._times = defaultdict(list)
        self._evaluated = 0
        self._stopped = False
        events.request.add_listener(self._on_request)

    def alarm_started(self, step: int, request_id: str) -> None:
        """Called by AlarmDevice when it starts an alarm."""
        self._in_flight[step][request_id] = time.perf_counter()

    def _on_request(self, name, exception, context=None, response_time=0.0, **_kwargs):
        if name != ALARM_PATH or exception is not None or not context:
            return
        step = context.get("step")
        if step is None:
            return
        self._times[step].append(response_time)
        self._in_flight[step].pop(context.get("request_id"), None)

    def _broke_limits(self, step: int) -> bool:
        now = time.perf_counter()
        times = self._times[step] + [(now - t) * 1000 for t in self._in_flight[step].values()]
        average = sum(times) / len(times) if times else 0.0
        maximum = max(times, default=0.0)
        LOGGER.info(
            "step %d: %d users, %d alarms acknowledged, %d still unacknowledged, "
            "response avg %.0f ms, max %.0f ms",
            step + 1,
            STEP_USERS * (step + 1),
            len(self._times[step]),
            len(self._in_flight[step]),
            average,
            maximum,
        )
        if average > LIMIT_AVG_MS or maximum > LIMIT_MAX_MS:
            LOGGER.warning(
                "step %d broke the EN 50136 limits (avg > %g s or max > %g s); stopping",
                step + 1,
                LIMIT_AVG_MS / 1000,
                LIMIT_MAX_MS / 1000,
            )
            return True
        return False

    def tick(self):
        if self._stopped:
            return None
        run_time = self.get_run_time()
        period = STEP_S + PAUSE_S
        step = int(run_time // period)
        # Every step whose pause is over is judged once.
        while self._evaluated < min(step, MAX_STEPS):
            if self._broke_limits(self._evaluated):
                self._stopped = True
                return None
            self._evaluated += 1
        if step >= MAX_STEPS:
            LOGGER.info("%d steps done; stopping", MAX_STEPS)
            self._stopped = True
            return None
        users = STEP_USERS * (step + 1)
        if run_time - step * period < STEP_S:
            self.current_step = step
            # All of a step's users start within about a second.
            return (users, users)
        return (0, users)
