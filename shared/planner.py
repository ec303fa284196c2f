"""The planner: which device trains which block, with how much of the link.

`plan(fleet, job, config)` is the one entry point.  The formulation it solves
is written out in `shared/costmodel.py` (costs), `shared/crunch.py` (min-max
matching for a fixed split), `shared/bandwidth.py` (joint matching and shares)
and `shared/boundaries.py` (choosing block boundaries); in short:

    minimise  T = max_b  S'_b / (β_{σ(b)} R_{σ(b)}) + K_local · t_step(σ(b), s_b)
    over a one-to-one matching σ of blocks to devices and shares Σ β ≤ 1,
    subject to m(b) ≤ M_{σ(b)},

with S'_b = w · (S_tot + S_b) the bytes a round puts on the wire for block b (w = 4/3: base64).

Steps: check the inputs → fix the blocks (the job's, or a chosen split) →
diagnose memory infeasibility (a block no device can hold, or blocks that share
too few devices) → solve jointly (exact by default; dual ascent on request),
and solve with the other method too so the report carries the gap → score the
baselines on the same blocks.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from shared.bandwidth import DualConfig, JointResult, brute_force_joint, joint_dual_ascent, joint_exact
from shared.boundaries import (EXACT_MAX_DEVICES, BoundaryChoice, blocks_from_cuts, brute_force_boundaries,
                               choose_boundaries, default_block_count, equal_cuts)
from shared.costmodel import Costs, block_costs, step_times
from shared.crunch import hall_violation
from shared.errors import InputError
from shared.plan_baselines import all_baselines
from shared.profiles import Block, DeviceProfile, Fleet, Job, check_fleet, check_fleet_for_job, check_job


@dataclass(frozen=True)
class PlannerConfig:
    """Planner settings."""

    solver: str = "exact"          # "exact" (T-search + assignment) or "dual" (dual ascent)
    choose_boundaries: bool = True  # for jobs without blocks: search the split (else equal-size)
    baselines: bool = True          # score the baselines beside the plan
    random_seeds: int = 100         # the random baseline averages this many matchings
    seed: int = 0                   # seed of the random baseline
    dual: DualConfig = field(default_factory=DualConfig)
    exact_max_devices: int = EXACT_MAX_DEVICES  # exact boundaries up to this many usable devices


@dataclass(frozen=True)
class DevicePlan:
    """One row of the plan: a device, its block (or none) and its costs."""

    device: str
    block: str | None          # None: idle this round
    first_layer: int | None
    last_layer: int | None
    share: float               # β_k, fraction of the link
    compute_s: float           # K_local · t_step per round
    comm_s: float              # bytes / (β R) per round
    round_s: float             # compute + comm (0 when idle)
    memory_bytes: float        # m(b) (0 when idle)
    memory_limit_bytes: float  # M_k
    profile: str = "estimated"  # "estimated", or "measured YYYY-MM-DD[, at T=64 only ...]" (`DeviceProfile.source_for`)


@dataclass(frozen=True)
class Plan:
    """The planner's answer."""

    fleet: str
    job: str
    round_s: float                         # T, the round latency
    devices: tuple[DevicePlan, ...]        # every device of the fleet, in fleet order
    blocks: tuple[Block, ...]              # the blocks trained, shallowest first
    solver: str                            # the solver whose plan this is ("exact" if dual ascent failed)
    boundaries_chosen: bool                # True when the planner chose the split
    equal_blocks_round_s: float | None     # with equal-size blocks instead (chosen split only)
    boundary_saving: float | None          # 1 − round_s / equal_blocks_round_s
    exact_round_s: float                   # the exact joint optimum on these blocks
    dual_round_s: float | None             # dual ascent on these blocks; None if it failed
    dual_gap: float | None                 # dual_round_s / exact_round_s − 1; None if it failed
    baselines: dict[str, float]            # baseline -> round latency (s); inf = infeasible
    # How the blocks were fixed: "given" (the job's), "equal" (asked for), "exact" (the
    # optimal contiguous split) or "heuristic" (local search; see boundary_lower_bound_s).
    boundary_method: str = "given"
    boundary_lower_bound_s: float | None = None  # no contiguous split is faster (chosen splits only)
    notes: tuple[str, ...] = ()            # what the planner had to decide for the user, in words
    # The share of steps at each length the step times were priced at (the job's step_mix;
    # () = every step at the job's full length).
    step_mix: tuple[tuple[int, float], ...] = ()

    def to_dict(self) -> dict:
        """Plain data for JSON (inf becomes None)."""
        def clean(value):
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [clean(v) for v in value]
            return value
        return clean(asdict(self))


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def _bytes(value: float) -> str:
    """A byte count in the largest unit that keeps it >= 1, three significant digits: never '0.00'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.3g} B"


def _limit(device: DeviceProfile, need: float) -> str:
    """A device's memory limit, with how far it is below ``need`` when it is."""
    short = need - device.memory_bytes
    return f"{device.name} {_gib(device.memory_bytes)}" + (f" ({_bytes(short)} short)" if short > 0 else "")


def _check_placeable(fleet: Fleet, costs: Costs, blocks: tuple[Block, ...]) -> None:
    """Raise InputError naming the block (and why) if no matching fits in memory."""
    n_dev, n_blocks = costs.compute_s.shape
    if n_blocks > n_dev:
        raise InputError(f"the job has {n_blocks} blocks but the fleet has {n_dev} devices; "
                         f"each device trains at most one block")
    fits = costs.fits
    for b, block in enumerate(blocks):
        if not fits[:, b].any():
            need = float(costs.memory_need[b])
            limits = ", ".join(_limit(d, need) for d in fleet.devices)
            raise InputError(
                f"block {block.name!r} (layers {block.first_layer}-{block.last_layer}) fits on no device: "
                f"it needs {_gib(need)} of memory; device limits: {limits}")
    violation = hall_violation(fits)
    if violation is not None:
        vb, vd = violation
        names = ", ".join(repr(blocks[b].name) for b in vb)
        devs = ", ".join(fleet.devices[k].name for k in vd) or "none"
        raise InputError(f"blocks {names} fit only on {len(vd)} device(s) ({devs}); "
                         f"each device trains one block, so {len(vb) - len(vd)} of them cannot be placed")


def _rows(fleet: Fleet, job: Job, blocks: tuple[Block, ...], costs: Costs, result: JointResult) -> tuple[DevicePlan, ...]:
    block_of = {k: b for b, k in enumerate(result.device_of_block)}
    rows = []
    for k, device in enumerate(fleet.devices):
        b = block_of.get(k)
        if b is None:
            rows.append(DevicePlan(device.name, None, None, None, 0.0, 0.0, 0.0, 0.0, 0.0, device.memory_bytes,
                                   device.source_for(job)))
            continue
        share = result.shares[k]
        compute = float(costs.compute_s[k, b])
        comm = float(costs.transfer_s[k, b] / share)
        blk = blocks[b]
        rows.append(DevicePlan(device.name, blk.name, blk.first_layer, blk.last_layer, share, compute, comm,
                               compute + comm, float(costs.memory_need[b]), device.memory_bytes,
                               device.source_for(job)))
    return tuple(rows)


def _dual(costs: Costs, config: DualConfig) -> tuple[JointResult | None, str | None]:
    """Dual ascent, or (None, why) if it fails: the exact plan never depends on it."""
    try:
        result = joint_dual_ascent(costs, config)
    except ArithmeticError as exc:  # a planner must not crash on valid input; say so instead
        return None, f"dual ascent failed ({type(exc).__name__}: {exc})"
    if result is None or not math.isfinite(result.round_s):
        return None, "dual ascent found no feasible plan"
    return result, None


def _chosen_split(fleet: Fleet, job: Job, steps, config: PlannerConfig,
                  notes: list[str]) -> tuple[BoundaryChoice, int]:
    """The split the planner chooses; with the default count, the most blocks that fit.

    The default count (one block per device that can hold the deepest single layer)
    can be more than memory allows once the blocks must sit at different depths; then
    fewer blocks are tried, and the plan says so.  A count the job gives is kept.
    """
    n_blocks = default_block_count(fleet, job)
    choice = choose_boundaries(fleet, job, n_blocks, steps, config.exact_max_devices)
    first = n_blocks
    while choice.result is None and job.n_blocks is None and n_blocks > 1:
        n_blocks -= 1
        choice = choose_boundaries(fleet, job, n_blocks, steps, config.exact_max_devices)
    if n_blocks < first and choice.result is not None:
        notes.append(f"{first} blocks (one per device that can hold a layer) fit in memory in no split; "
                     f"planned {n_blocks}")
    if choice.result is None and job.n_blocks is not None and n_blocks > 1:
        raise InputError(f"job {job.name!r}: no split of layers {job.trainable_first}-{job.trainable_last} "
                         f"into {n_blocks} blocks fits in memory with one block per device; "
                         f"give fewer blocks (n_blocks)")
    return choice, n_blocks


def plan(fleet: Fleet, job: Job, config: PlannerConfig = PlannerConfig()) -> Plan:
    """Match blocks to devices and split the link so the round is as short as possible.

    Args:
        fleet: measured device profiles.
        job: the job; with no blocks the planner chooses the split.
        config: solver choice and baseline settings.

    Returns:
        The `Plan`.

    Raises:
        InputError: bad or inconsistent input, or a block that fits on no device.
    """
    # 1. check the inputs
    if config.solver not in ("exact", "dual"):
        raise InputError(f"planner solver must be 'exact' or 'dual', got {config.solver!r}")
    check_fleet(fleet)
    check_job(job)
    check_fleet_for_job(fleet, job)
    steps = step_times(fleet, job)
    notes: list[str] = []

    # 2. the blocks: the job's, equal-size ones, or the split we choose
    equal_round: float | None = None
    bound: float | None = None
    if job.blocks:
        blocks, method = job.blocks, "given"
    elif not config.choose_boundaries:
        blocks, method = blocks_from_cuts(job, equal_cuts(job.trainable_layers, default_block_count(fleet, job))), \
            "equal"
    else:
        choice, n_blocks = _chosen_split(fleet, job, steps, config, notes)
        method, bound = choice.method, choice.lower_bound_s
        if choice.result is not None:
            blocks = choice.blocks
            equal_round = choice.equal_result.round_s if choice.equal_result is not None else math.inf
        else:  # nothing fits: the equal split names the block that cannot be placed
            blocks = choice.equal_blocks
        if method == "heuristic":
            notes.append(f"block boundaries by local search ({config.exact_max_devices} devices is the exact "
                         f"limit); no split is faster than {bound:.2f} s")
    chosen = method in ("exact", "heuristic")

    # 3. memory: name the block that cannot be placed, and why
    costs = block_costs(fleet, job, blocks, steps)
    _check_placeable(fleet, costs, blocks)

    # 4. solve exactly; dual ascent as asked or for the gap, never in the way of the exact plan
    exact = joint_exact(costs)
    assert exact is not None  # placeability was checked above
    dual, failure = _dual(costs, config.dual)
    solver = config.solver
    if failure is not None:
        notes.append(failure + ("; the exact plan is shown" if solver == "dual" else ""))
        solver = "exact"
    result = dual if solver == "dual" and dual is not None else exact
    if equal_round is None and chosen:
        equal_round = result.round_s

    # 5. baselines on the same blocks (equal-size ones for a chosen split)
    baselines: dict[str, float] = {}
    if config.baselines:
        base_blocks = blocks
        if chosen:
            base_blocks = blocks_from_cuts(job, equal_cuts(job.trainable_layers, len(blocks)))
        baselines = all_baselines(fleet, job, base_blocks, steps, config.random_seeds, config.seed)

    return Plan(
        fleet=fleet.name, job=job.name, round_s=result.round_s,
        devices=_rows(fleet, job, blocks, costs, result), blocks=tuple(blocks), solver=solver,
        boundaries_chosen=chosen, equal_blocks_round_s=equal_round if chosen else None,
        boundary_saving=(1.0 - result.round_s / equal_round) if chosen and equal_round else None,
        exact_round_s=exact.round_s, dual_round_s=None if dual is None else dual.round_s,
        dual_gap=None if dual is None else (dual.round_s / exact.round_s - 1.0 if exact.round_s > 0 else 0.0),
        baselines=baselines, boundary_method=method,
        boundary_lower_bound_s=bound if chosen else None, notes=tuple(notes), step_mix=job.step_mix,
    )


def brute_force_round(fleet: Fleet, job: Job) -> float:
    """Reference for `plan`'s round latency, by enumeration (tests and the benchmark).

    The job's blocks: every matching (`brute_force_joint`).  Chosen boundaries: every
    contiguous split (`brute_force_boundaries`), with the block count `plan` uses (the
    job's, or the most from the default count down that some split can place).

    Returns:
        The optimal round latency, +inf if nothing fits.
    """
    steps = step_times(fleet, job)
    if job.blocks:
        return brute_force_joint(block_costs(fleet, job, job.blocks, steps))
    counts = [job.n_blocks] if job.n_blocks is not None else range(default_block_count(fleet, job), 0, -1)
    for n_blocks in counts:
        best = brute_force_boundaries(fleet, job, n_blocks, steps)
        if math.isfinite(best):
            return best
    return math.inf


def summary_rows(result: Plan) -> list[list[str]]:
    """The plan as table rows of text (header first), for the CLI."""
    rows = [["device", "block", "layers", "share", "compute s", "comm s", "round s", "memory use/limit",
             "profile"]]
    for r in result.devices:
        layers = "-" if r.block is None else f"{r.first_layer}-{r.last_layer}"
        use = "-" if r.block is None else _gib(r.memory_bytes).split()[0]
        rows.append([r.device, r.block or "(idle)", layers, f"{r.share:.3f}", f"{r.compute_s:.2f}",
                     f"{r.comm_s:.2f}", f"{r.round_s:.2f}", f"{use} / {_gib(r.memory_limit_bytes)}", r.profile])
    return rows
