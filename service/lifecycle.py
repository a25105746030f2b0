"""Start-up helpers of the gateway: wait for Kafka instead of failing, and say when no topic matches.

- `until_kafka_answers`: the first contact with the brokers is retried with exponential
  backoff (0.5 s doubling to 30 s), one warning per attempt, until it succeeds or the
  gateway is asked to stop; no traceback.
- `watch_topics`: the consumer's metadata refreshed every 5 s, so a new partner topic is
  consumed within seconds (not at `kafka.metadata_max_age_ms`, 30 s); and a warning
  while the request-topic pattern matches no topic (a typo in
  `kafka.request_topic_prefix`, or partner topics not created yet), repeated every
  minute, with one line when topics appear; likewise while the brokers do not know the usage
  topic (`kafka.usage_topic`): billed calls' outcomes go out with their metering records, so
  without it they wait (unless the brokers create topics on first use).
- `report_slow_stop`: a stop still under way `after_s` after it was asked for logs what each
  task of the process is waiting on (its chain of awaits), so a shutdown that hangs until the
  orchestrator kills it says where.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError

from service.config.kafka import ConnectFailure, client_kwargs, connect_failure
from service.config.settings import KafkaSettings
from service.telemetry.logs import REPEAT_S, Throttle

log = logging.getLogger("service.lifecycle")

FIRST_DELAY_S = 0.5
MAX_DELAY_S = 30.0
DISCOVERY_S = 5.0
MAX_TOPICS_NAMED = 20
"""A warning about missing topics names at most this many (and says how many there are)."""


async def bootstrap(settings: KafkaSettings) -> None:
    """Reach the brokers once with a throwaway client (raises `KafkaError` when none answers)."""
    client = AIOKafkaClient(**client_kwargs(settings))
    try:
        await client.bootstrap()
    finally:
        await client.close()


async def until_kafka_answers(
    stop: asyncio.Event,
    settings: KafkaSettings,
    *,
    start: Callable[[KafkaSettings], Awaitable[None]] = bootstrap,
    first_delay_s: float = FIRST_DELAY_S,
    max_delay_s: float = MAX_DELAY_S,
    on_failure: Callable[[str], None] | None = None,
) -> bool:
    """Call `start` (by default: `bootstrap`) until it succeeds (True) or `stop` is set first
    (False). The gateway's own clients start once this answered. `on_failure(cause)` hears
    why each attempt failed (the cause of the connection's failure, with a hint when it is a
    setting: a refused SASL login, an untrusted certificate)."""
    delay = first_delay_s
    attempt = 0
    while not stop.is_set():
        attempt += 1
        try:
            await start(settings)
            if attempt > 1:
                log.info("Kafka answered", extra={"attempts": attempt})
            return True
        except KafkaError as exc:
            failure = connect_failure(settings.bootstrap_servers)
            if failure is None:  # no connection failed: the error itself is all there is
                failure = ConnectFailure(type(exc).__name__, None, False, time.monotonic())
            if on_failure is not None:
                on_failure(failure.cause if failure.hint is None else f"{failure.cause} ({failure.hint})")
            log.log(
                logging.ERROR if failure.certain else logging.WARNING,  # a setting to fix, not an outage
                "Kafka refused the gateway at start; retrying"
                if failure.certain
                else "Kafka unreachable at start; retrying",
                extra={
                    "bootstrap_servers": settings.bootstrap_servers,
                    "error": type(exc).__name__,
                    "cause": failure.cause,
                    "hint": failure.hint,
                    "attempt": attempt,
                    "retry_in_s": round(delay, 1),
                },
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(max_delay_s, delay * 2)
    return False


async def watch_topics(
    subscription: Callable[[], set[str]],
    refresh: Callable[[], Awaitable[object]],
    stop: asyncio.Event,
    settings: KafkaSettings,
    *,
    every_s: float = DISCOVERY_S,
    repeat_s: float = REPEAT_S,
    known_topics: Callable[[], set[str]] | None = None,
    outcome_topics: Callable[[], set[str]] | None = None,
) -> None:
    """Every `every_s`, ask the brokers for metadata (`refresh`: a new partner topic is then
    consumed within seconds, not at `kafka.metadata_max_age_ms`), and warn, at most every
    `repeat_s`, while no topic matches `{request_topic_prefix}.+`, or `known_topics` (all the
    brokers' topics) lacks `kafka.usage_topic` or one of the `outcome_topics` (the response
    and dead-letter topics the request topics consumed need)."""
    no_topic, no_usage_topic = Throttle(repeat_s), Throttle(repeat_s)
    no_outcome_topic = Throttle(repeat_s)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
        if stop.is_set():
            return
        with contextlib.suppress(KafkaError, TimeoutError):
            await asyncio.wait_for(refresh(), every_s)
        if known_topics is not None and subscription():
            if settings.usage_topic in known_topics():
                no_usage_topic.clear()
            elif no_usage_topic.due():
                log.warning(
                    "the usage topic does not exist: billed calls' outcomes wait for it",
                    extra={
                        "topic": settings.usage_topic,
                        "hint": "create it (claude-gateway topics ensure), or check kafka.usage_topic",
                    },
                )
        if known_topics is not None and outcome_topics is not None:
            _warn_missing_outcome_topics(sorted(outcome_topics() - known_topics()), no_outcome_topic)
        if subscription():
            if no_topic.warned:
                log.info("request topics found", extra={"topics": len(subscription())})
            no_topic.clear()
        elif no_topic.due():
            log.warning(
                "no topic matches the request-topic pattern: nothing to consume",
                extra={
                    "pattern": f"^{settings.request_topic_prefix}.+",
                    "hint": "create the partners' request topics, or check kafka.request_topic_prefix",
                },
            )


def _warn_missing_outcome_topics(missing: list[str], throttle: Throttle) -> None:
    if not missing:
        throttle.clear()
    elif throttle.due():
        log.warning(
            "outcome topics do not exist: the outcomes of requests read from the matching request "
            "topics wait for them, and so does everything after them on each partition",
            extra={
                "topics": missing[:MAX_TOPICS_NAMED],
                "missing": len(missing),
                "hint": "create them (claude-gateway topics ensure), or remove the request topic "
                "if no partner should send there",
            },
        )


async def report_slow_stop(stop: asyncio.Event, after_s: float) -> None:
    """Once `stop` is set and `after_s` have passed (cancel this when the stop ends): a warning
    naming every other task and the chain of awaits it is suspended in."""
    await stop.wait()
    await asyncio.sleep(after_s)
    me = asyncio.current_task()
    tasks = sorted((t for t in asyncio.all_tasks() if t is not me), key=lambda t: t.get_name())
    log.warning(
        "still stopping",
        extra={
            "after_s": after_s,
            "tasks": len(tasks),
            "waiting": "\n".join(f"{t.get_name()}: {awaits(t)}" for t in tasks),  # one line each
        },
    )


def awaits(task: asyncio.Task[object]) -> str:
    """Where `task` is suspended: each coroutine or generator of its chain of awaits, outermost
    first, as `function (file:line)`."""
    out: list[str] = []
    link: object = task.get_coro()
    while link is not None:
        frame = getattr(link, "cr_frame", None) or getattr(link, "gi_frame", None)
        if frame is not None:
            out.append(f"{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})")
        link = getattr(link, "cr_await", None) or getattr(link, "gi_yieldfrom", None)
    return " > ".join(out) or repr(task)
