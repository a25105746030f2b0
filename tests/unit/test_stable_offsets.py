"""The stable offset read (service/ingest/stable_offsets.py) against a scripted group
coordinator: a commit answered UNSTABLE_OFFSET_COMMIT for `unstable_max_s` in a row raises
`UnstableOffset` (the writer then ends a hanging transaction); other retriable answers in
between (the coordinator moving, loading) do not count towards it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition

from service.ingest.stable_offsets import UNSTABLE_OFFSET_COMMIT, UnstableOffset, fetch_committed_stable

TP = TopicPartition("claude.requests.p", 0)
COORDINATOR_NOT_AVAILABLE = 15


class _Coordinator:
    group_id = "g"

    def __init__(self, answers: list[int | tuple[int, str]]) -> None:
        self.answers = answers
        self.asked = 0
        self.dead = 0

    async def ensure_coordinator_known(self) -> None:
        return None

    def coordinator_dead(self) -> None:
        self.dead += 1

    async def _send_req(self, request: Any) -> Any:
        answer = self.answers[min(self.asked, len(self.answers) - 1)]
        self.asked += 1
        code, offset, metadata = (0, *answer) if isinstance(answer, tuple) else (answer, -1, "")
        partition = (TP.partition, offset, -1, metadata, code, {})
        return SimpleNamespace(error_code=0, topics=[(TP.topic, [partition], {})])


async def test_a_commit_pending_for_unstable_max_s_raises_unstable_offset() -> None:
    coordinator = _Coordinator([UNSTABLE_OFFSET_COMMIT])
    with pytest.raises(UnstableOffset):
        await fetch_committed_stable(coordinator, TP, unstable_max_s=0.3)
    assert 3 <= coordinator.asked <= 5


async def test_other_retriable_answers_restart_the_count() -> None:
    # 0.15 s unstable, a coordinator error, 0.4 s unstable: never 0.3 s unstable in a row
    coordinator = _Coordinator(
        [
            UNSTABLE_OFFSET_COMMIT,
            UNSTABLE_OFFSET_COMMIT,
            COORDINATOR_NOT_AVAILABLE,
            UNSTABLE_OFFSET_COMMIT,
            (42, "meta"),
        ]
    )
    assert await fetch_committed_stable(coordinator, TP, unstable_max_s=0.3) == (42, "meta")
    assert coordinator.dead == 1


async def test_a_stable_answer_comes_back_at_once() -> None:
    coordinator = _Coordinator([(7, "")])
    assert await fetch_committed_stable(coordinator, TP, unstable_max_s=0.0) == (7, "")
    assert coordinator.asked == 1


async def test_only_an_unstable_answer_is_taken_for_a_hang() -> None:
    # 0.35 s unstable, then a coordinator error: the count restarts, the commit comes stable
    coordinator = _Coordinator(
        [
            UNSTABLE_OFFSET_COMMIT,
            UNSTABLE_OFFSET_COMMIT,
            UNSTABLE_OFFSET_COMMIT,
            COORDINATOR_NOT_AVAILABLE,
            (9, ""),
        ]
    )
    assert await fetch_committed_stable(coordinator, TP, unstable_max_s=0.3) == (9, "")
