"""Low-watermark commits: only offsets below the first unfinished one may be committed."""

import random

from hypothesis import given
from hypothesis import strategies as st

from service.ingest.offsets import PartitionOffsets


def test_commit_point_waits_for_the_oldest_unfinished() -> None:
    po = PartitionOffsets()
    for o in (10, 11, 12):
        po.start(o)
    assert po.committable() == 10
    po.finish(12)
    po.finish(11)
    assert po.committable() == 10  # 10 still in flight
    po.finish(10)
    assert po.committable() == 13
    po.committed = 13
    assert po.committable() is None


def test_seek_back_forgets_later_offsets() -> None:
    po = PartitionOffsets()
    for o in (5, 6, 7):
        po.start(o)
    po.finish(7)
    po.start(6)  # redelivery after a reset
    po.finish(5)
    assert po.committable() == 6
    po.finish(6)
    assert po.committable() == 7


@given(st.integers(min_value=1, max_value=200), st.randoms(use_true_random=False))
def test_never_commits_past_an_unfinished_offset(n: int, rnd: random.Random) -> None:
    po = PartitionOffsets()
    for o in range(n):
        po.start(o)
    order = list(range(n))
    rnd.shuffle(order)
    finished: set[int] = set()
    for o in order:
        po.finish(o)
        finished.add(o)
        point = po.committable()
        assert point is not None
        assert all(x in finished for x in range(point))
        assert point == n or point not in finished
    assert po.committable() == n
    assert po.in_flight == 0
