"""The fleet engine: Qt-free and asyncio-based, behind both `deftly run` and the dashboard.

A view builds an :class:`Engine` from an :class:`EngineConfig`, subscribes to its
typed events (``desktop.engine.events``) with a callback or a queue, reads its
:class:`~desktop.engine.state.EngineState`, and calls ``run()``, ``stop()``,
``pause()``, ``resume()``, ``begin()``, ``add_agent()`` or ``reprofile()`` (a dashboard:
``open()`` first, ``run(config)`` at its Start, ``close()`` at the end). See
``desktop.engine.engine`` for the flow; ``desktop.engine.client`` is the desktop
side of one agent connection, ``desktop.engine.local`` runs agent processes on
this machine (tests, benchmarks, a simulated lab).
"""
from __future__ import annotations

from desktop.engine.engine import Engine, EngineConfig, RunResult
from desktop.engine.job import JobSpec, load_job
from desktop.engine.state import DeviceView, EngineState

__all__ = ["DeviceView", "Engine", "EngineConfig", "EngineState", "JobSpec", "RunResult", "load_job"]
