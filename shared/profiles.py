"""The planner's inputs as data: measured device profiles and a job description.

A *fleet* is a list of `DeviceProfile`s; each holds what an agent measures on its
device (docs/design.md, "Planning"):

* `layer_s_bs[l]`   τ_k(l, bs): seconds for one forward of layer l on bs rows,
* `layer_s_wide[l]` τ_k(l, 2q·bs): the same on the 2q·bs widened rows,
* `head_s`          the LM head at the answer positions, once per step,
* `memory_bytes`    M_k, the memory the training program may use,
* `link_bytes_per_s` R_k, the rate of the shared link if this device had all of it.

A length-1 tuple of layer times means "every layer costs the same" (handy for
hand-written fleets); measured profiles give one entry per layer.  Those times
are at the job's full sequence length T; `at_lengths` holds the same two
tuples at each shorter length bucket the device timed (`LengthTimes`; empty in
hand-written fleets and in profiles measured before probes had buckets).

A `Job` says what is trained: the model's layer count L, the trainable layers,
the payload (bytes of the LoRA-FA B tensors) per trainable layer, q, bs, the
local steps per round, its full sequence length T and the share of steps that
run at each length bucket (`step_mix`; empty: every step at T), the memory the program needs (two hand-worked terms for
a hypothetical job; for an exported one, measured, per depth:
`shared.job_model.job_from_manifests`), and either the blocks
(contiguous layer ranges with their payload) or nothing, in which case the
planner chooses the block boundaries itself (`shared/boundaries.py`).

The `check_*` functions raise `InputError` naming the field at fault; loaders
(`shared/fleet_io.py`) and the planner call them, so profiles built in code by
an agent get the same checks as files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from shared.errors import InputError
from shared.records import from_plain, to_plain


@dataclass(frozen=True)
class DeviceFacts:
    """What a device says about itself when it measures its profile."""

    cpu: str                # CPU model name ("" where the system does not say)
    cores: int              # logical CPUs
    ram_bytes: float        # physical memory
    executorch: str         # ExecuTorch version of the runtime that ran the probe
    simd: tuple[str, ...]   # SIMD flags from /proc/cpuinfo (e.g. avx2, avx512f, asimd, neon); () where absent
    system: str = ""        # operating system and machine, e.g. "Linux x86_64"


@dataclass(frozen=True)
class ProbeMemory:
    """Resident memory (bytes) the probe took on the device, step by step: the memory model's terms."""

    runtime_bytes: float             # the process before the probe was opened (Python, numpy, the runtime)
    open_bytes: float                # opening the probe program with its weights file
    load_bytes: dict[str, float]     # per method: loading it (XNNPACK packs the layer's weights, plans memory)
    run_bytes: dict[str, float]      # per method: its first call (XNNPACK sizes its workspace)


# The probe program's format (`shared.probe.ProbeManifest.format`); a measurement records the
# one it ran, so that a profile measured with an older probe is refused (`check_device`).
PROBE_FORMAT = 4  # 2: the T-dependent methods also at each shorter length bucket; 3: and layer_bs_pair, the call's own cost;
# 4: chains of each layer method in place of the pair (shared.probe.CHAINS), whose slope is a layer's cost


@dataclass(frozen=True)
class Measurement:
    """How a measured profile was measured: when, with which probe, how steady."""

    at: str                       # ISO 8601 UTC time of the measurement
    probe: str                    # `ProbeManifest.probe_id`: the model and shapes the probe timed
    model_id: str                 # the probe's model, by name
    repeats: int                  # timed calls per probe method (after warm-up)
    method_s: dict[str, float]    # probe method -> median seconds per call
    spread: dict[str, float]      # probe method -> (p90 − p10) / median over the repeats
    memory: ProbeMemory
    facts: DeviceFacts
    probe_format: int = 1         # PROBE_FORMAT of the probe it ran (records written before it: 1)


@dataclass(frozen=True)
class LengthTimes:
    """A device's per-layer times at one shorter length bucket T' (as `DeviceProfile`'s own at T)."""

    seq_len: int                     # T', tokens per row
    layer_s_bs: tuple[float, ...]    # τ_k(l, bs) at T', seconds; len 1 = uniform
    layer_s_wide: tuple[float, ...]  # τ_k(l, 2q·bs) at T', seconds


@dataclass(frozen=True)
class DeviceProfile:
    """One device as measured (or, in example fleets, estimated)."""

    name: str
    layer_s_bs: tuple[float, ...]    # τ_k(l, bs), seconds per layer forward; len 1 = uniform
    layer_s_wide: tuple[float, ...]  # τ_k(l, 2q·bs), seconds; must be >= layer_s_bs layer by layer
    head_s: float                    # LM head at the answer positions, seconds per step
    memory_bytes: float              # M_k: usable memory for the training program
    link_bytes_per_s: float          # R_k: full-band link rate (bytes/s)
    measurement: Measurement | None = None  # how it was measured; None: estimated (a hand-written fleet)
    at_lengths: tuple[LengthTimes, ...] = ()  # the layer times at shorter length buckets, ascending T'

    def times_at(self, seq_len: int) -> LengthTimes | None:
        """The layer times at a shorter length ``seq_len``; None where the device has none."""
        return next((t for t in self.at_lengths if t.seq_len == seq_len), None)

    @property
    def measured(self) -> bool:
        return self.measurement is not None

    @property
    def source(self) -> str:
        """"measured YYYY-MM-DD" or "estimated": what the plan says about this profile."""
        return "estimated" if self.measurement is None else f"measured {self.measurement.at[:10]}"

    def source_for(self, job: "Job") -> str:
        """`source`, and where the job runs steps at a length this profile has no times for,
        that its full-length times stand in: e.g. "measured 2026-12-01, at T=64 only"."""
        missing = missing_lengths(self, job)
        if not missing or job.seq_len is None:
            return self.source
        return f"{self.source}, at T={job.seq_len} only (no times at T={'/'.join(map(str, missing))})"


def missing_lengths(device: DeviceProfile, job: "Job") -> tuple[int, ...]:
    """The shorter lengths the job runs steps at (share > 0) that the device has no times for."""
    return tuple(length for length, share in job.step_mix
                 if share > 0 and length != job.seq_len and device.times_at(length) is None)


@dataclass(frozen=True)
class Fleet:
    """The devices one job may use, in the order they were listed."""

    name: str
    devices: tuple[DeviceProfile, ...]


@dataclass(frozen=True)
class Block:
    """A contiguous range of trainable layers trained by one device."""

    name: str
    first_layer: int      # s_b, the block's depth (0 = the embedding side)
    last_layer: int       # inclusive
    payload_bytes: float  # S_b: bytes of the block's B tensors


@dataclass(frozen=True)
class Job:
    """One fine-tuning job.  `blocks == ()` lets the planner choose boundaries."""

    name: str
    layers: int                         # L: decoder layers of the model
    trainable_first: int                # shallowest trainable layer
    trainable_last: int                 # deepest trainable layer (inclusive)
    layer_payload_bytes: float          # B bytes per trainable layer (used when boundaries are chosen)
    q: int                              # random directions per step
    bs: int                             # rows per batch
    local_steps: int                    # K_local: steps per device per round
    memory_base_bytes: float            # weights + runtime, needed whatever the block
    memory_per_wide_layer_bytes: float  # extra bytes per layer run on 2q·bs rows
    blocks: tuple[Block, ...] = field(default=())  # fixed blocks, shallowest first; () = choose
    n_blocks: int | None = None         # with chosen boundaries: how many (None = one per usable device)
    # Measured instead of the two terms above: the program's memory for a block starting at
    # layer d, entry d for d = 0..L-1, without the 2q perturbed copies of its B
    # (`shared.job_model.MemoryModel`); () = use memory_base + memory_per_wide_layer.
    memory_at_depth_bytes: tuple[float, ...] = field(default=())
    # The sequence length T the devices' full-length times are for (None: not known, a
    # hand-written job), and the share of steps at each length, as (T', share) pairs that
    # sum to 1 (`shared.job_model.step_mix`); () = every step at T.
    seq_len: int | None = None
    step_mix: tuple[tuple[int, float], ...] = field(default=())

    @property
    def trainable_layers(self) -> int:
        return self.trainable_last - self.trainable_first + 1


def _positive(value: float, where: str, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        need = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise InputError(f"{where} must be {need}, got {value!r}")


def _check_layer_fields(times: DeviceProfile | LengthTimes, at: str) -> None:
    """``layer_s_bs`` and ``layer_s_wide`` of a profile or of one of its lengths: non-empty, each ≥ 0."""
    for fname in ("layer_s_bs", "layer_s_wide"):
        values = getattr(times, fname)
        if len(values) == 0:
            raise InputError(f"{at}: field '{fname}' is empty")
        for i, t in enumerate(values):
            _positive(t, f"{at}: {fname}[{i}]", allow_zero=True)


def check_device(device: DeviceProfile, where: str = "") -> None:
    """Check one profile on its own.

    Raises:
        InputError: naming the device and the field.
    """
    at = where or f"device {device.name!r}"
    if not device.name:
        raise InputError(f"{at}: field 'name' is empty")
    _check_layer_fields(device, at)
    _positive(device.head_s, f"{at}: head_s", allow_zero=True)
    _positive(device.memory_bytes, f"{at}: memory_bytes")
    _positive(device.link_bytes_per_s, f"{at}: link_bytes_per_s")
    _check_times(device.layer_s_bs, device.layer_s_wide, at)
    lengths = [t.seq_len for t in device.at_lengths]
    if lengths != sorted(set(lengths)):
        raise InputError(f"{at}: at_lengths must list each length once, shortest first, got {lengths}")
    for i, times in enumerate(device.at_lengths):
        tat = f"{at}: at_lengths[{i}] (T={times.seq_len})"
        if not isinstance(times.seq_len, int) or isinstance(times.seq_len, bool) or times.seq_len < 1:
            raise InputError(f"{tat}: seq_len must be an integer >= 1")
        _check_layer_fields(times, tat)
        _check_times(times.layer_s_bs, times.layer_s_wide, tat)
    if device.measurement is not None and device.measurement.probe_format != PROBE_FORMAT:
        raise InputError(f"{at}: measured with probe format {device.measurement.probe_format}, this deftly "
                         f"reads {PROBE_FORMAT} (the probe now times chains of each layer); re-profile the "
                         f"device (`deftly profile`, or the dashboard's re-profile)")


def _check_times(bs: tuple[float, ...], wide: tuple[float, ...], at: str) -> None:
    """τ(l, bs) and τ(l, 2q·bs) of one length: matching lengths, and bs ≤ wide layer by layer."""
    if len(bs) != len(wide) and 1 not in (len(bs), len(wide)):
        raise InputError(f"{at}: layer_s_bs has {len(bs)} entries but layer_s_wide has {len(wide)}")
    n = max(len(bs), len(wide))
    for i in range(n):
        b, w = bs[i if len(bs) > 1 else 0], wide[i if len(wide) > 1 else 0]
        # Monotonicity in depth rests on this: moving a layer from 2q·bs rows to bs rows never costs more.
        if w < b:
            raise InputError(f"{at}: layer_s_wide[{i}] = {w} is below layer_s_bs[{i}] = {b}; "
                             f"a layer on 2q·bs rows cannot be faster than on bs rows")


def profile_to_plain(profile: DeviceProfile) -> dict:
    """A profile as JSON values (the one codec, `shared.records`), e.g. for the wire."""
    return to_plain(profile)


def profile_from_plain(data: object, where: str = "profile") -> DeviceProfile:
    """Decode and check a profile.

    Raises:
        InputError: a field missing, unknown, of the wrong type or out of range, named.
    """
    profile = from_plain(DeviceProfile, data, where)
    check_device(profile, where)
    return profile


def check_fleet(fleet: Fleet) -> None:
    """Check a fleet: at least one device, unique names, every profile sane.

    Raises:
        InputError: naming the device and the field.
    """
    if not fleet.devices:
        raise InputError(f"fleet {fleet.name!r}: no devices (field 'device' is empty)")
    seen: set[str] = set()
    for i, device in enumerate(fleet.devices):
        check_device(device, f"device[{i}] {device.name!r}")
        if device.name in seen:
            raise InputError(f"device[{i}]: name {device.name!r} is used twice")
        seen.add(device.name)


def check_job(job: Job) -> None:
    """Check a job's fields and its blocks for consistency.

    Raises:
        InputError: naming the field or the block.
    """
    at = f"job {job.name!r}"
    for fname in ("layers", "q", "bs", "local_steps"):
        value = getattr(job, fname)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"{at}: field '{fname}' must be an integer >= 1, got {value!r}")
    for fname in ("trainable_first", "trainable_last"):
        value = getattr(job, fname)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < job.layers:
            raise InputError(f"{at}: field '{fname}' must be a layer index in 0..{job.layers - 1}, got {value!r}")
    if job.trainable_last < job.trainable_first:
        raise InputError(f"{at}: trainable_last ({job.trainable_last}) is below trainable_first ({job.trainable_first})")
    _positive(job.layer_payload_bytes, f"{at}: layer_payload_bytes")
    _positive(job.memory_base_bytes, f"{at}: memory_base_bytes", allow_zero=True)
    _positive(job.memory_per_wide_layer_bytes, f"{at}: memory_per_wide_layer_bytes", allow_zero=True)
    if job.memory_at_depth_bytes:
        if len(job.memory_at_depth_bytes) != job.layers:
            raise InputError(f"{at}: memory_at_depth_bytes has {len(job.memory_at_depth_bytes)} entries, "
                             f"expected one per layer ({job.layers})")
        for i, value in enumerate(job.memory_at_depth_bytes):
            _positive(value, f"{at}: memory_at_depth_bytes[{i}]", allow_zero=True)
    _check_step_mix(job, at)
    if job.n_blocks is not None:
        if job.blocks:
            raise InputError(f"{at}: give either 'blocks' or 'n_blocks', not both")
        if not isinstance(job.n_blocks, int) or not 1 <= job.n_blocks <= job.trainable_layers:
            raise InputError(f"{at}: n_blocks must be an integer in 1..{job.trainable_layers} "
                             f"(the trainable layers), got {job.n_blocks!r}")
    names: set[str] = set()
    previous_last = job.trainable_first - 1
    for i, block in enumerate(job.blocks):
        bat = f"{at}: block[{i}] {block.name!r}"
        if not block.name:
            raise InputError(f"{at}: block[{i}] has an empty name")
        if block.name in names:
            raise InputError(f"{bat}: name used twice")
        names.add(block.name)
        _positive(block.payload_bytes, f"{bat}: payload_bytes")
        if not (job.trainable_first <= block.first_layer <= block.last_layer <= job.trainable_last):
            raise InputError(f"{bat}: layers {block.first_layer}..{block.last_layer} are not inside the "
                             f"trainable layers {job.trainable_first}..{job.trainable_last}")
        # Shallowest first and disjoint: CRUNCH's nested sets rely on the depth order.
        if block.first_layer <= previous_last:
            raise InputError(f"{bat}: starts at layer {block.first_layer}, which overlaps or precedes the "
                             f"previous block (ends at {previous_last}); list blocks shallowest first, disjoint")
        previous_last = block.last_layer


def _check_step_mix(job: Job, at: str) -> None:
    """A mix needs the full length T; its lengths are distinct, at most T, and its shares sum to 1."""
    if job.seq_len is not None and (not isinstance(job.seq_len, int) or isinstance(job.seq_len, bool)
                                    or job.seq_len < 1):
        raise InputError(f"{at}: field 'seq_len' must be an integer >= 1, got {job.seq_len!r}")
    if not job.step_mix:
        return
    if job.seq_len is None:
        raise InputError(f"{at}: a step_mix needs the job's full length 'seq_len'")
    lengths = [length for length, _ in job.step_mix]
    if len(set(lengths)) != len(lengths) or any(
            not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= job.seq_len for t in lengths):
        raise InputError(f"{at}: step_mix lengths {lengths} must be distinct integers in 1..{job.seq_len}")
    for length, share in job.step_mix:
        _positive(share, f"{at}: step_mix share at T={length}", allow_zero=True)
    total = sum(share for _, share in job.step_mix)
    if abs(total - 1.0) > 1e-6:
        raise InputError(f"{at}: step_mix shares sum to {total:.6f}, not 1")


def check_fleet_for_job(fleet: Fleet, job: Job) -> None:
    """Check that every profile has layer times for the job's L layers.

    Raises:
        InputError: naming the device and the field.
    """
    for i, device in enumerate(fleet.devices):
        for times, label in ((device, ""), *((t, f"at_lengths T={t.seq_len}: ") for t in device.at_lengths)):
            for fname in ("layer_s_bs", "layer_s_wide"):
                n = len(getattr(times, fname))
                if n not in (1, job.layers):
                    raise InputError(f"device[{i}] {device.name!r}: {label}{fname} has {n} entries but job "
                                     f"{job.name!r} has {job.layers} layers (give one per layer, or one for all)")
