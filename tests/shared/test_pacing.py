"""The pacer's schedule, on a fake clock: no sleeps, no sockets."""
from __future__ import annotations

import asyncio
import math

import pytest

from shared.errors import InputError
from shared.pacing import deadlines, fragments, paced_fragments


class FakeTime:
    """A clock that moves only when slept on (or when a test moves it), recording each sleep."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _send(text: str, rate: float, fake: FakeTime, fragment_bytes: int, work_s: float = 0.0) -> list[tuple[float, str]]:
    """Drain the pacer as websockets' send() would: (time each fragment went out, fragment), then the end time."""
    async def drain() -> list[tuple[float, str]]:
        out = []
        async for piece in paced_fragments(text, rate, fragment_bytes=fragment_bytes, clock=fake.clock,
                                           sleep=fake.sleep):
            out.append((fake.now, piece))
            fake.now += work_s  # the sender's own time per fragment (writing the frame)
        out.append((fake.now, ""))  # the final, empty fragment
        return out

    return asyncio.run(drain())


def test_fragments_cover_the_text_in_order_and_none_is_over_the_size() -> None:
    text = "x" * 10 + "y" * 7
    pieces = fragments(text, 4)
    assert "".join(pieces) == text
    assert [len(p) for p in pieces] == [4, 4, 4, 4, 1]
    assert fragments("", 4) == []
    with pytest.raises(InputError, match="fragment size 0"):
        fragments(text, 0)


def test_each_deadline_is_the_bytes_so_far_over_the_rate() -> None:
    assert deadlines([4, 4, 2], 2.0) == [2.0, 4.0, 5.0]
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(InputError, match="pacing rate"):
            deadlines([4], bad)


def test_a_paced_message_goes_out_fragment_by_fragment_and_ends_after_its_bytes_over_the_rate() -> None:
    fake = FakeTime()
    text = "a" * 1000
    sent = _send(text, 100.0, fake, fragment_bytes=300)  # 10 s for 1000 bytes at 100 B/s
    times = [t - 100.0 for t, _ in sent]
    assert "".join(piece for _, piece in sent) == text
    # fragment i leaves once the ones before it have crossed; the message ends at len / rate
    assert times == pytest.approx([0.0, 3.0, 6.0, 9.0, 10.0])
    assert sum(fake.sleeps) == pytest.approx(10.0)


def test_a_sender_that_falls_behind_is_not_made_to_wait_and_the_message_still_averages_the_rate() -> None:
    fake = FakeTime()
    # each fragment takes the sender 5 s, more than its 3 s at the rate: no wait after it
    sent = _send("b" * 900, 100.0, fake, fragment_bytes=300, work_s=5.0)
    assert fake.sleeps == []
    assert sent[-1][0] - 100.0 == pytest.approx(15.0)  # its own pace, never sped up past it
    # the sender's own time per fragment is taken out of the wait, not added to it
    fake = FakeTime()
    sent = _send("c" * 900, 100.0, fake, fragment_bytes=300, work_s=1.0)
    assert [t - 100.0 for t, _ in sent] == pytest.approx([0.0, 3.0, 6.0, 9.0])
    assert fake.sleeps == pytest.approx([2.0, 2.0, 2.0])  # the deadlines are counted from the start


def test_a_bad_rate_is_refused_before_anything_is_sent() -> None:
    fake = FakeTime()
    with pytest.raises(InputError, match="pacing rate"):
        _send("abc", 0.0, fake, fragment_bytes=2)
