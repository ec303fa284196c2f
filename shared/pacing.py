"""Pacing: one text message sent no faster than a given rate, as WebSocket fragments.

The plan splits one shared link among the devices: device k gets a share β_k
of its link's rate R_k and is predicted to move a round's bytes in
``bytes / (β_k · R_k)`` (``shared.costmodel``). Nothing on a loopback or a fast
LAN holds a sender to that share, so the round's two big frames (the global b
down in ``StartRound``, the device's block up in ``RoundDone``) are paced here:
the frame is cut into fragments of ``PACE_FRAGMENT_BYTES`` and, after fragment
i has gone out, the sender waits until the rate has carried every byte up to
and including it::

    deadline_i = start + (bytes of fragments 0..i) / rate        [s]

so the message ends (its final, empty fragment goes out after the last wait)
no sooner than ``len / rate`` after it began — what a link of that rate would
take — and at no moment has more than one fragment gone out ahead of the rate.
The deadlines are counted from the start, not from the last wake-up, so the
sender's own time and a sleep that overshoots are not added up over the
fragments; a sender slower than the rate does not wait at all. Both sides use
it: ``websockets``' ``send()`` takes the async iterator of fragments (pings and
pongs still go between them), and the receiver gets one message as before
(``max_size`` counts the whole message).

Pure but for the injected ``clock`` and ``sleep`` (the tests pass fakes).
"""
from __future__ import annotations

import asyncio
import math
import time
from typing import AsyncIterator, Awaitable, Callable, Sequence

from shared.errors import InputError
from shared.protocol_limits import PACE_FRAGMENT_BYTES


def _check_rate(bytes_per_s: float) -> None:
    if not (isinstance(bytes_per_s, (int, float)) and math.isfinite(bytes_per_s) and bytes_per_s > 0):
        raise InputError(f"pacing rate {bytes_per_s!r}: expected a finite positive number of bytes/s")


def fragments(text: str, fragment_bytes: int = PACE_FRAGMENT_BYTES) -> list[str]:
    """``text`` cut into pieces of at most ``fragment_bytes`` characters (the protocol's frames are ASCII).

    Raises:
        InputError: ``fragment_bytes`` < 1.
    """
    if fragment_bytes < 1:
        raise InputError(f"fragment size {fragment_bytes}: expected at least 1 byte")
    return [text[i:i + fragment_bytes] for i in range(0, len(text), fragment_bytes)]


def deadlines(sizes: Sequence[int], bytes_per_s: float) -> list[float]:
    """Seconds after the start by which the rate has carried fragments 0..i, for each i.

    Args:
        sizes: bytes of each fragment, in order.
        bytes_per_s: the allotted rate.

    Returns:
        [len(sizes)] non-decreasing seconds; the last is ``sum(sizes) / bytes_per_s``.

    Raises:
        InputError: the rate is not finite and positive.
    """
    _check_rate(bytes_per_s)
    out, carried = [], 0
    for size in sizes:
        carried += size
        out.append(carried / bytes_per_s)
    return out


async def paced_fragments(text: str, bytes_per_s: float, *, fragment_bytes: int = PACE_FRAGMENT_BYTES,
                          clock: Callable[[], float] = time.monotonic,
                          sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> AsyncIterator[str]:
    """Yield the fragments of ``text``, each followed by a wait until its deadline (see the module docstring).

    Args:
        text: one encoded message (``shared.protocol.encode``).
        bytes_per_s: the allotted rate.
        fragment_bytes: the largest fragment.
        clock: monotonic seconds (``time.monotonic``).
        sleep: waits that many seconds (``asyncio.sleep``).

    Raises:
        InputError: a rate that is not finite and positive (before anything is yielded).
    """
    pieces = fragments(text, fragment_bytes)
    due = deadlines([len(piece.encode("utf-8")) for piece in pieces], bytes_per_s)
    start = clock()
    for piece, deadline in zip(pieces, due):
        yield piece
        wait = start + deadline - clock()
        if wait > 0:
            await sleep(wait)
