"""Shared pieces of the LPS Locust files: configuration from the environment, the request
id, the HTTP client and the client ledger.

Imported by locustfile.py and background.py; it defines no User or shape class, so Locust
picks nothing up from it. The semantics follow `lps load` (crates/lps/src/load.rs).
"""

import json
import os
import time

import httpx
from locust import events

# The compose host ports of ars-comp-1-{1,2,3} on this machine.
DEFAULT_ENTRIES = "http://127.0.0.1:7081,http://127.0.0.1:7082,http://127.0.0.1:7083"
# The compose host port of ars-comp-3 (the simulator).
DEFAULT_SIMULATOR = "http://127.0.0.1:8084"


def env_flag(name: str) -> bool:
    """`1|true|yes` (any case) is true, like the services' USE_HTTP_2 and SKIP_DNS_CACHE."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def env_number(name: str, default, kind=float):
    """`name` from the environment as `kind` (float or int), or `default` when unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise SystemExit(f"error: {name}={raw!r} is not {what}") from None


def env_float(name: str, default: float) -> float:
    return env_number(name, default, float)


def env_int(name: str, default: int) -> int:
    return env_number(name, default, int)


def split_urls(value: str) -> list[str]:
    """A comma-separated list of base URLs, without trailing slashes."""
    return [url.strip().rstrip("/") for url in value.split(",") if url.strip()]


def entries(host: str | None) -> list[str]:
    """Entry base URLs in rotation order: LPS_ENTRIES, else Locust's --host (which may be a
    comma-separated list, as upstream allowed), else the compose ports 7081-7083."""
    value = os.environ.get("LPS_ENTRIES") or host or DEFAULT_ENTRIES
    urls = split_urls(value)
    if not urls:
        raise SystemExit(f"error: no entry URL in {value!r}")
    return urls


def request_id() -> str:
    """A new request id: a time-ordered UUID (v7) as a decimal integer, as `lps load` makes
    them (upstream: `uuid1().int`). At most 39 digits."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    rand_a = rand >> 68  # 12 bits
    rand_b = rand & ((1 << 62) - 1)  # 62 bits
    value = (
        (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    )
    return str(value)


def now_us() -> int:
    """Wall clock, microseconds since the Unix epoch (the unit of every LPS ledger)."""
    return time.time_ns() // 1000


def http_client(http2: bool) -> httpx.Client:
    """One pooled client per process, like upstream's RepeatingHttpxClient.CLIENT.

    `http2=True` speaks h2c with prior knowledge (httpx with HTTP/1.1 disabled does that on
    plain http://), otherwise HTTP/1.1. Proxy variables from the environment are ignored:
    the load goes straight to the given addresses. Timeouts as `lps load`: 3 s to connect,
    60 s for the answer (upstream's REQUEST_TIMEOUT).
    """
    return httpx.Client(
        http1=not http2,
        http2=http2,
        trust_env=False,
        timeout=httpx.Timeout(60.0, connect=3.0),
        limits=httpx.Limits(
            max_connections=50_000, max_keepalive_connections=1_000, keepalive_expiry=30
        ),
    )


class Ledger:
    """The client ledger (LPS_LEDGER): one JSON line per finished request, in the format of
    `lps load`'s client_ledger.jsonl (crates/lps/src/records.rs, ClientRecord), so that
    `lps analyze` and the tests read Locust runs like their own.

    Each line is one write(2) on an O_APPEND descriptor, so several Locust processes
    (distributed mode) may share the file.
    """

    def __init__(self, path: str | None):
        self._fd = None
        if path:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, record: dict) -> None:
        if self._fd is not None:
            os.write(self._fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def record(
    *,
    id: str,
    kind: str,
    user: int,
    step: int,
    first_send_us: int,
    success_us: int | None,
    attempts: int,
    endpoints: list[str],
    last_status: int,
) -> dict:
    """A ClientRecord; status `ok` when it succeeded, else `failed`."""
    return {
        "id": id,
        "kind": kind,
        "user": user,
        "step": step,
        "first_send_us": first_send_us,
        "success_us": success_us,
        "attempts": attempts,
        "endpoints": endpoints,
        "last_status": last_status,
        "status": "ok" if success_us is not None else "failed",
    }


class Session:
    """A Locust file's HTTP client and client ledger. The ledger opens when Locust starts
    (`LPS_LEDGER`, none when unset); both close when Locust quits."""

    def __init__(self, http2: bool):
        self.client = http_client(http2)
        self.ledger = Ledger(None)
        events.init.add_listener(self._open)
        events.quit.add_listener(self._close)

    def _open(self, environment, **_kwargs):
        self.ledger = Ledger(os.environ.get("LPS_LEDGER"))

    def _close(self, **_kwargs):
        self.ledger.close()
        self.client.close()
