"""The dashboard's load test (behind `deftly bench ui`), small: every point sent is plotted, frames are timed."""
from __future__ import annotations

from desktop.ui.loadtest import stream_into_window


def test_streams_through_the_bridge_reach_the_plots_without_a_loss(qapp, tmp_path) -> None:
    result = stream_into_window(devices=6, rate_hz=20.0, seconds=1.0, out=tmp_path / "run", size=(1000, 700))
    assert result.sent == 6 * 20 and result.plotted == result.sent and result.dropped == 0
    assert len(result.frames_ms) > 20 and len(result.frames_cpu_ms) == len(result.frames_ms)
    assert result.worst_frame_ms >= result.median_frame_ms > 0
    assert result.worst_frame_cpu_ms >= max(result.p99_frame_cpu_ms, result.cpu_in_worst_frame_ms) > 0
