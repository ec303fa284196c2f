"""Tests for device_agent/simulate.py: device classes, the simulated clock, the link shaper."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from device_agent.simulate import DEVICE_CLASSES, LinkShaper, SimulatedClock, load_device_class, paced_rate
from shared.errors import InputError


def test_the_shipped_classes_load_and_carry_lab3s_factors() -> None:
    pi = load_device_class("pi4-4gb")
    assert (pi.compute_factor, pi.memory_gib, pi.link_mbit_s, pi.cores) == (4.0, 3.0, 60.0, 4)
    assert pi.link_bytes_per_s == 7.5e6
    assert load_device_class("laptop").compute_factor == 0.6
    assert DEVICE_CLASSES.is_file()


def test_a_class_file_of_ones_own_and_bad_classes_are_named(tmp_path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text('[[class]]\nname = "tiny"\ndescription = "x"\ncompute_factor = 2\nmemory_gib = 0.5\n'
                    'link_mbit_s = 8\ncores = 1\n[[class]]\nname = "bad"\ndescription = "x"\ncompute_factor = 0\n'
                    'memory_gib = 1\nlink_mbit_s = 8\ncores = 1\n')
    assert load_device_class(f"{path}:tiny").memory_bytes == 2**29
    with pytest.raises(InputError, match="compute_factor must be a positive number"):
        load_device_class(f"{path}:bad")
    with pytest.raises(InputError, match=r"no such device class .* \(known: laptop"):
        load_device_class("toaster")


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_the_simulated_clock_counts_only_its_own_threads_cpu_time_scaled() -> None:
    clock = SimulatedClock(compute_factor=3.0)
    stop = threading.Event()
    rival = threading.Thread(target=lambda: [_spin(0.01) for _ in iter(stop.is_set, True)])  # another agent's load
    rival.start()
    try:
        start_wall, start = time.perf_counter(), clock()
        _spin(0.2)
        time.sleep(0.2)  # waiting is not compute
        simulated, wall = clock() - start, time.perf_counter() - start_wall
    finally:
        stop.set()
        rival.join()
    assert simulated == pytest.approx(3.0 * 0.2, rel=0.1)
    assert wall > 0.4  # the host's wall time moved on regardless


def test_the_link_shaper_holds_bytes_to_its_rate_without_idle_credit() -> None:
    async def carry() -> float:
        shaper = LinkShaper(bytes_per_s=1e6)
        await asyncio.sleep(0.05)  # idle time must not let the next burst through faster
        start = time.monotonic()
        for _ in range(10):
            await shaper.carry(20_000)
        return time.monotonic() - start

    assert asyncio.run(carry()) >= 0.2 * 0.98  # 200 kB at 1 MB/s


def test_a_frame_allotted_less_than_the_simulated_link_is_paced_and_not_also_booked_on_it() -> None:
    link = LinkShaper(bytes_per_s=1e6)
    assert paced_rate(link, 5e5) == 5e5  # a 50 % share: paced at it, the shaper left out (else 1.5x)
    assert paced_rate(link, 1e6) is None and paced_rate(link, 4e6) is None  # the link is the slower: shaped
    assert paced_rate(link, None) is None  # no allotment: shaped as any frame
    assert paced_rate(None, 5e5) == 5e5 and paced_rate(None, None) is None  # a real device
