"""The planner: which device trains which block, with how much of the link.

`plan(fleet, job, config)` is the one entry point.  The formulation it solves
is written out in `shared/costmodel.py` (costs), `shared/crunch.py` (min-max
matching for a fixed split), `shared/bandwidth.py` (joint matching and shares)
and `shared/boundaries.py` (choosing block boundaries); in short:

    minimise  T = max_b  S'_b / (β_{σ(b)} R_{σ(b)}) + K_local · t_step(σ(b), s_b)
    over a one-to-one matching σ of blocks to devices and shares Σ β ≤ 1,
    subject to m(b) ≤ M_{σ(b)},

with S'_b = S_tot + S_b the bytes a round moves for block b.

Steps: check the inputs → fix the blocks (the job's, or a chosen split) →
diagnose memory infeasibility (a block no device can hold, or blocks that share
too few devices) → solve jointly (exact by default; dual ascent on request),
and solve with the other method too so the report carries the gap → score the
baselines on the same blocks.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from shared.bandwidth import DualConfig, JointResult, joint_dual_ascent, joint_exact
from shared.boundaries import blocks_from_cuts, choose_boundaries, default_block_count, equal_cuts
from shared.costmodel import Costs, block_costs, step_times
from shared.crunch import hall_violation
from shared.errors import InputError
from shared.plan_baselines import all_baselines
from shared.profiles import Block, Fleet, Job, check_fleet, check_fleet_for_job, check_job


@dataclass(frozen=True)
class PlannerConfig:
    """Planner settings."""

    solver: str = "exact"          # "exact" (T-search + assignment) or "dual" (dual ascent)
    choose_boundaries: bool = True  # for jobs without blocks: search the split (else equal-size)
    baselines: bool = True          # score the baselines beside the plan
    random_seeds: int = 100         # the random baseline averages this many matchings
    seed: int = 0                   # seed of the random baseline
    dual: DualConfig = field(default_factory=DualConfig)


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


@dataclass(frozen=True)
class Plan:
    """The planner's answer."""

    fleet: str
    job: str
    round_s: float                         # T, the round latency
    devices: tuple[DevicePlan, ...]        # every device of the fleet, in fleet order
    blocks: tuple[Block, ...]              # the blocks trained, shallowest first
    solver: str
    boundaries_chosen: bool                # True when the planner chose the split
    equal_blocks_round_s: float | None     # with equal-size blocks instead (chosen split only)
    boundary_saving: float | None          # 1 − round_s / equal_blocks_round_s
    exact_round_s: float                   # the exact joint optimum on these blocks
    dual_round_s: float                    # dual ascent on these blocks
    dual_gap: float                        # dual_round_s / exact_round_s − 1
    baselines: dict[str, float]            # baseline -> round latency (s); inf = infeasible

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


def _check_placeable(fleet: Fleet, costs: Costs, blocks: tuple[Block, ...]) -> None:
    """Raise InputError naming the block (and why) if no matching fits in memory."""
    n_dev, n_blocks = costs.compute_s.shape
    if n_blocks > n_dev:
        raise InputError(f"the job has {n_blocks} blocks but the fleet has {n_dev} devices; "
                         f"each device trains at most one block")
    limits = ", ".join(f"{d.name} {_gib(d.memory_bytes)}" for d in fleet.devices)
    fits = costs.fits
    for b, block in enumerate(blocks):
        if not fits[:, b].any():
            raise InputError(
                f"block {block.name!r} (layers {block.first_layer}-{block.last_layer}) fits on no device: "
                f"it needs {_gib(costs.memory_need[b])} of memory; device limits: {limits}")
    violation = hall_violation(fits)
    if violation is not None:
        vb, vd = violation
        names = ", ".join(repr(blocks[b].name) for b in vb)
        devs = ", ".join(fleet.devices[k].name for k in vd) or "none"
        raise InputError(f"blocks {names} fit only on {len(vd)} device(s) ({devs}); "
                         f"each device trains one block, so {len(vb) - len(vd)} of them cannot be placed")


def _rows(fleet: Fleet, blocks: tuple[Block, ...], costs: Costs, result: JointResult) -> tuple[DevicePlan, ...]:
    block_of = {k: b for b, k in enumerate(result.device_of_block)}
    rows = []
    for k, device in enumerate(fleet.devices):
        b = block_of.get(k)
        if b is None:
            rows.append(DevicePlan(device.name, None, None, None, 0.0, 0.0, 0.0, 0.0, 0.0, device.memory_bytes))
            continue
        share = result.shares[k]
        compute = float(costs.compute_s[k, b])
        comm = float(costs.transfer_s[k, b] / share)
        blk = blocks[b]
        rows.append(DevicePlan(device.name, blk.name, blk.first_layer, blk.last_layer, share, compute, comm,
                               compute + comm, float(costs.memory_need[b]), device.memory_bytes))
    return tuple(rows)


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

    def solve(costs: Costs) -> JointResult | None:
        return joint_exact(costs) if config.solver == "exact" else joint_dual_ascent(costs, config.dual)

    # 2. the blocks: the job's, or a split we choose
    equal_round: float | None = None
    if job.blocks:
        blocks = job.blocks
        chosen = False
    else:
        n_blocks = default_block_count(fleet, job)
        choice = choose_boundaries(fleet, job, n_blocks, steps, solve) if config.choose_boundaries else None
        if choice is not None and choice.result is not None:
            blocks = choice.blocks
            equal_round = choice.equal_result.round_s if choice.equal_result is not None else math.inf
        else:
            blocks = blocks_from_cuts(job, equal_cuts(job.trainable_layers, n_blocks))
        chosen = True

    # 3. memory: name the block that cannot be placed, and why
    costs = block_costs(fleet, job, blocks, steps)
    _check_placeable(fleet, costs, blocks)

    # 4. solve with both methods: the chosen one is the plan, the other gives the gap
    exact = joint_exact(costs)
    dual = joint_dual_ascent(costs, config.dual)
    assert exact is not None and dual is not None  # placeability was checked above
    result = exact if config.solver == "exact" else dual
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
        devices=_rows(fleet, blocks, costs, result), blocks=tuple(blocks), solver=config.solver,
        boundaries_chosen=chosen, equal_blocks_round_s=equal_round if chosen else None,
        boundary_saving=(1.0 - result.round_s / equal_round) if chosen and equal_round else None,
        exact_round_s=exact.round_s, dual_round_s=dual.round_s,
        dual_gap=dual.round_s / exact.round_s - 1.0 if exact.round_s > 0 else 0.0,
        baselines=baselines,
    )


def summary_rows(result: Plan) -> list[list[str]]:
    """The plan as table rows of text (header first), for the CLI."""
    rows = [["device", "block", "layers", "share", "compute s", "comm s", "round s", "memory use/limit"]]
    for r in result.devices:
        layers = "-" if r.block is None else f"{r.first_layer}-{r.last_layer}"
        use = "-" if r.block is None else _gib(r.memory_bytes).split()[0]
        rows.append([r.device, r.block or "(idle)", layers, f"{r.share:.3f}", f"{r.compute_s:.2f}",
                     f"{r.comm_s:.2f}", f"{r.round_s:.2f}", f"{use} / {_gib(r.memory_limit_bytes)}"])
    return rows
