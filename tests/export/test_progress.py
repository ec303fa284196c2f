"""Export progress events: the fraction, the estimate of what is left, the stages' times."""
from __future__ import annotations

from export.progress import METHOD_STAGES, ExportProgress, ProgressTracker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_moves_forward_and_estimates_only_after_a_measured_stage() -> None:
    # prepare: two methods to lower, one at a time, on a clock the test moves
    events: list[ExportProgress] = []
    clock = Clock()
    tracker = ProgressTracker(events.append, clock)
    tracker.expect_methods(2)
    # execute: preparation, then two methods of 10 s each
    tracker.skip("load", "model given")
    assert events[-1].remaining_s is None  # nothing measured yet: no guess
    tracker.begin("tokenise", "tokenising")
    clock.now += 1.0
    tracker.end("tokenise", "tokenised")
    tracker.skip("quantise", "fp32")
    tracker.skip("calibrate", "none")
    tracker.plan_methods(2)
    for method in ("step", "eval"):
        for stage in METHOD_STAGES:
            tracker.begin(stage, f"{stage} {method}", "L1", method)
            clock.now += {"export": 0.5, "lower": 8.5, "emit": 0.5, "store": 0.5}[stage]
            tracker.tick(stage, f"{stage} {method}", "L1", method)
            tracker.end(stage, f"{stage} {method}", "L1", method)
    tracker.begin("write", "writing")
    tracker.end("write", "wrote")
    tracker.finish("done")
    # assert
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert events[-1].stage == "done" and events[-1].elapsed_s == 21.0
    lowered = [e for e in events if e.stage == "lower" and e.state == "end"]
    assert [(e.method, e.seconds) for e in lowered] == [("step", 8.5), ("eval", 8.5)]
    # after the first method the estimate is about the second method's time
    after_first = next(e for e in events if e.stage == "emit" and e.state == "end" and e.method == "step")
    assert 5.0 < after_first.remaining_s < 20.0
    assert events[-1].remaining_s == 0.0


def test_a_running_stage_advances_the_fraction_but_never_past_its_share() -> None:
    clock = Clock()
    events: list[ExportProgress] = []
    tracker = ProgressTracker(events.append, clock)
    tracker.expect_methods(1)
    tracker.begin("tokenise", "tokenising")
    clock.now += 1.0
    tracker.end("tokenise", "tokenised")  # a rate: 10 s per method
    tracker.begin("lower", "lowering step", "L1", "step")
    start = tracker.fraction
    clock.now += 3.0
    mid = tracker.fraction
    clock.now += 1000.0
    late = tracker.fraction
    assert start < mid < late < 1.0


def test_parallel_workers_divide_the_estimate() -> None:
    def remaining(parallel: int) -> float:
        clock = Clock()
        tracker = ProgressTracker(None, clock)
        tracker.plan_methods(4, parallel=parallel)
        tracker.begin("lower", "lowering", "L1", "step")
        clock.now += 10.0
        tracker.end("lower", "lowered", "L1", "step")
        return tracker.remaining_s()

    assert remaining(2) == remaining(1) / 2
