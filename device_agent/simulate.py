"""``--simulate CLASS``: one machine stands in for a device of another class.

A simulated agent runs the real program on the host and changes three things,
each as the device would have it (README, "Simulated devices"):

* **compute, on a simulated clock.** The agent's ExecuTorch threadpool is set to
  one thread (``_unsafe_reset_threadpool(1)``, ExecuTorch 1.5.1's pybindings),
  so the whole step runs on the compute thread and that thread's CPU time
  (``time.thread_time``) is exactly the step's compute: it does not grow when
  other agents on the same cores make this one wait for a core, which wall time
  would. A step's device seconds are that CPU time times the class's
  ``compute_factor``; every time the agent reports (step seconds, the round's
  seconds) is on this clock. The clock may run faster than the host (a laptop
  class, factor 0.6): nothing waits for it. When it runs slower (a Pi, factor 4),
  the agent also waits, after each step, until the wall time since the round
  began has caught up with the simulated time, so a dashboard sees the step
  rate the device would have; that wait never changes a reported time.
* **memory, capped** at the class's limit: a program whose estimated need does
  not fit is refused before it is loaded, and a round whose peak resident memory
  passes the limit fails, as the device's OS would end it.
* **the link, shaped** to the class's rate: every frame in either direction
  is booked on one link of that rate (both directions share it, as they share
  a Wi-Fi channel). A frame the agent sends leaves when its bytes have crossed;
  a chunk it receives is written and hashed at once and acknowledged when its
  bytes would have crossed, so the desktop, which waits for acknowledgements,
  sends no faster than the link. A round's frames paced below the class rate
  (the plan's share of the link, ``StartRound.link_bytes_per_s``) go at that
  pace instead and are not booked twice (:func:`paced_rate`).

Device classes live in ``assets/fleets/classes/device_classes.toml``.
"""
from __future__ import annotations

import asyncio
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from shared.errors import InputError

DEVICE_CLASSES = Path(__file__).resolve().parents[1] / "assets" / "fleets" / "classes" / "device_classes.toml"
_CLASS_KEYS = {"name", "description", "compute_factor", "memory_gib", "link_mbit_s", "cores"}
# A loaded method holds ~1.22x the weights file in resident memory (SmolLM2 fp32: 538 MB of
# weights, +658 MB for the first method; device_agent/program.py); rounded up.
LOADED_BYTES_PER_WEIGHT_BYTE = 1.25


@dataclass(frozen=True)
class DeviceClass:
    """A kind of device, as ``--simulate`` imitates it."""

    name: str
    description: str
    compute_factor: float  # device seconds per CPU-second of one host core
    memory_gib: float  # what one app may use
    link_mbit_s: float  # its Wi-Fi throughput
    cores: int

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)

    @property
    def link_bytes_per_s(self) -> float:
        return self.link_mbit_s * 1e6 / 8


def load_device_class(spec: str, path: Path | None = None) -> DeviceClass:
    """The class ``spec`` names: ``NAME`` (in ``assets/fleets/classes/device_classes.toml``) or ``FILE.toml:NAME``.

    Raises:
        InputError: no such file or class, or a class with a missing, unknown or non-positive field.
    """
    if path is None:
        file_part, sep, name = spec.rpartition(":")
        path, spec = (Path(file_part), name) if sep and file_part.endswith(".toml") else (DEVICE_CLASSES, spec)
    try:
        tables = tomllib.loads(Path(path).read_text()).get("class", [])
    except OSError as exc:
        raise InputError(f"--simulate {spec}: cannot read the device classes {path} ({exc.strerror}); "
                         f"give FILE.toml:CLASS") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML ({exc})") from None
    names = [t.get("name") for t in tables if isinstance(t, dict)]
    if spec not in names:
        raise InputError(f"--simulate {spec}: no such device class in {path} (known: {', '.join(map(str, names))})")
    table = tables[names.index(spec)]
    where = f"{path}: class {spec!r}"
    unknown, missing = sorted(set(table) - _CLASS_KEYS), sorted(_CLASS_KEYS - set(table))
    if unknown or missing:
        raise InputError(f"{where}: " + "; ".join(filter(None, [unknown and f"unknown keys {unknown}",
                                                                missing and f"missing keys {missing}"])))
    for key in ("compute_factor", "memory_gib", "link_mbit_s", "cores"):
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise InputError(f"{where}: {key} must be a positive number, got {value!r}")
    return DeviceClass(name=spec, description=str(table["description"]), compute_factor=float(table["compute_factor"]),
                       memory_gib=float(table["memory_gib"]), link_mbit_s=float(table["link_mbit_s"]),
                       cores=int(table["cores"]))


class SimulatedClock:
    """A compute clock for the device class: ``compute_factor`` x the calling thread's CPU seconds.

    Call it only from the compute thread (a step's time is ``clock()`` after minus before).
    """

    def __init__(self, compute_factor: float) -> None:
        self.compute_factor = compute_factor

    def __call__(self) -> float:
        return self.compute_factor * time.thread_time()


class Pacer:
    """Holds a simulated round back to the device's pace in wall time (never ahead of it)."""

    def __init__(self) -> None:
        self._wall_start = time.monotonic()
        self._simulated = 0.0

    async def after_step(self, simulated_seconds: float) -> None:
        """Wait until the wall time since the round began is at least the simulated time."""
        self._simulated += simulated_seconds
        behind = self._simulated - (time.monotonic() - self._wall_start)
        if behind > 0:
            await asyncio.sleep(behind)


class LinkShaper:
    """A link of a fixed rate: :meth:`carry` returns when its bytes would have crossed it.

    No credit builds up while the link is idle: a burst after a pause still goes at the rate.
    """

    def __init__(self, bytes_per_s: float) -> None:
        self.bytes_per_s = bytes_per_s
        self._free_at = 0.0

    def reserve(self, n_bytes: int) -> float:
        """Book the link for ``n_bytes`` after what it already carries; returns when they are across
        (``time.monotonic``). A received chunk is booked as it arrives and processed at once: the
        link carries the next bytes while the device writes and hashes these, as a real one would."""
        self._free_at = max(self._free_at, time.monotonic()) + n_bytes / self.bytes_per_s
        return self._free_at

    async def carry(self, n_bytes: int) -> None:
        """Wait until ``n_bytes`` booked now have crossed the link (a frame the device sends)."""
        delay = self.reserve(n_bytes) - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


def paced_rate(link: LinkShaper | None, allotted_bytes_per_s: float | None) -> float | None:
    """The rate to pace a frame at that the plan allotted ``allotted_bytes_per_s``; None: send it as any other.

    On a real device (``link`` None) the frame is paced at its allotment. A simulated link
    that is no faster than the allotment already holds the frame to its own rate, so the
    frame is booked on the shaper as any other. Below the class rate the frame is paced at
    the allotment and *not* booked on the shaper too: its bytes would count twice (a 50 %
    share would take 1.5x the time it was allotted).
    """
    if allotted_bytes_per_s is None or (link is not None and allotted_bytes_per_s >= link.bytes_per_s):
        return None
    return allotted_bytes_per_s


def estimated_need_bytes(resident_bytes: float, program_bytes: int, weights_bytes: int) -> float:
    """Resident memory once a program's first method is loaded: what the process holds now plus the method."""
    return resident_bytes + LOADED_BYTES_PER_WEIGHT_BYTE * (program_bytes + weights_bytes)
