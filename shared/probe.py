"""The probe program's manifest: which model and shapes a probe times, and its methods.

A *probe* is a small ExecuTorch program (`export/probe.py`) that a device runs to
measure the planner's inputs (`device_agent/profile.py`): one decoder layer of
the job's model at bs rows and at 2q·bs rows, the last layer at the answer
position, and the per-step head (final norm, head rows, loss, g and the update
of b), with the job's LoRA-FA shapes.  Every method reads the same layer's
weights, so the probe holds one layer, not the model.

Methods (all float tensors float32, index tensors int64; n = bs or 2q·bs rows,
c = 1 or 2q copies of one layer's B, P_l = B entries of one job layer):

* ``layer_bs``, ``layer_wide``: (h [n, T, H], b [c, P_l]) -> h [n, T, H]: a job layer (with LoRA);
* ``layer_bs_x2``, ``layer_bs_x4``, ``layer_wide_x2`` (`chain_method`): the same layer k times
  in one call (the same weights and B), as a program runs its layers back to back.  A layer's
  cost is the slope between two chains, (t(k₂) − t(k₁)) / (k₂ − k₁) (`layer_cost_s`), which
  leaves out what a call costs beyond its layers' work: a program pays that once a step, the
  probe once a call.  `CHAINS` says which two chains each method has, and why; the chains
  come at the full length only;
* ``frozen_bs``, ``frozen_wide``: (h [n, T, H]) -> h [n, T, H]: a layer outside the job (no LoRA),
  present only when the model has such layers below (``frozen_bs``) or above (``frozen_wide``) the job,
  with their chains (``frozen_bs_x4``, ``frozen_bs_x8``, ``frozen_wide_x2``);
* ``last_wide``: (h [2q·bs, T, H], positions [2q·bs], b [2q, P_l]) -> [2q·bs, H]: the last
  layer at the answer position (``b`` is read only when the last layer is a job layer);
* ``head``: (h [2q·bs, H], labels [bs], b [P], z [q, P], lr [1], eps [1])
  -> (b_new [P], loss [1], g [q], b_copies [2q, P]).

Every method but the head also comes at each of the job's shorter length
buckets T' (`ProbeManifest.length_buckets`), named as the programs name theirs:
``layer_wide_t32`` is ``layer_wide`` with T' = 32 in place of T (chains come at T only).  A device's
profile then carries the layer times at every length its programs run
(`DeviceProfile.at_lengths`); the head reads one position per row, so it has
one time.

The manifest is a record (`shared.records`): `ProbeManifest.to_json` / `from_json`.
Its `probe_id` names the model (by weights fingerprint) and the shapes, so a
profile measured with one probe is never taken for another model's
(`check_probe_matches`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from shared.errors import InputError
from shared.profiles import PROBE_FORMAT, DeviceProfile, LengthTimes, Measurement, check_device
from shared.records import RecordError, from_plain, to_plain

# PROBE_FORMAT (bump when the probe's methods or their signatures change) lives in
# shared.profiles, which records it in each measurement.
PROBE_SUFFIX = ".probe.json"
LAYER_METHODS = ("layer_bs", "layer_wide", "frozen_bs", "frozen_wide", "last_wide")

# The two chain lengths (k₁, k₂) each layer method is timed at; its cost per layer is the slope
# between them.  On bs rows a call is short: a single call's time is not on the line through the
# longer chains, and a 2-layer chain's wanders (SmolLM2 int8, a 2-core Xeon, in one process: 1, 2,
# 4 and 8 layers took 3.7, 8.8, 15.0 and 27.0 ms, and a 29-layer program ~3.1 ms a layer; in one
# `deftly bench profile` run with frozen chains of 2 and 4, 9.8 and 14.2 ms, a slope of 2.2, and
# every int8 block 17-30 ms under).  So the frozen layers below a job, most of a step's bs layers (22 of
# 29 in the default job), take the slope from 4 to 8; the job's own bs layers, at most the job's
# size, from 2 to 4 (each chain layer is one more layer to lower: the probe lowers 24, not 30).
# A widened layer's call is long, and 1 to 2 layers already give its in-program cost (31.7, 57.9
# ms: 26.2 ms a layer; 26.7 in the programs).  The last layer reads its rows at one position, so
# it cannot chain.
CHAINS = {"layer_bs": (2, 4), "frozen_bs": (4, 8), "layer_wide": (1, 2), "frozen_wide": (1, 2)}
# A slope below this share of the longer chain's mean time per layer is noise, not a cheap layer.
MIN_SLOPE_SHARE = 0.5


def chain_method(method: str, calls: int) -> str:
    """The method that runs a layer method's layer ``calls`` times in one call: ``layer_bs`` x4 -> ``layer_bs_x4``."""
    return method if calls == 1 else f"{method}_x{calls}"


def length_method(method: str, seq_len: int) -> str:
    """A layer method at a shorter length bucket: ``layer_wide`` at 32 -> ``layer_wide_t32``."""
    return f"{method}_t{seq_len}"


def split_method(name: str) -> tuple[str, int, int | None]:
    """``layer_bs_x4_t32`` -> (``layer_bs``, 4, 32); ``head`` -> (``head``, 1, None).

    A name that is no layer method (or a chain it does not have) comes back whole, once, at the full length.
    """
    base, seq_len = name, None
    head, _, tail = name.rpartition("_t")
    if tail.isdigit() and head:
        base, seq_len = head, int(tail)
    calls = 1
    head, _, tail = base.rpartition("_x")
    if tail.isdigit() and head in CHAINS and int(tail) in CHAINS[head]:
        base, calls = head, int(tail)
    if base not in LAYER_METHODS:
        return name, 1, None
    return base, calls, seq_len


def _is_probe_method(name: str, length_buckets: tuple[int, ...]) -> bool:
    """A name a probe can have: a layer method, one of its `CHAINS` at the full length, or a
    single call at a length bucket; spelled as `chain_method` / `length_method` spell it."""
    base, calls, seq_len = split_method(name)
    if base not in LAYER_METHODS or (seq_len is not None and (calls > 1 or seq_len not in length_buckets)):
        return False
    return name == _at(chain_method(base, calls), seq_len)  # not ``layer_wide_x1``: the single call is ``layer_wide``


@dataclass(frozen=True)
class ProbeManifest:
    """What one probe program times, and the files it needs."""

    model_id: str
    model_fingerprint: str        # sha256 of the model's fp32 weights (export.program.model_fingerprint)
    base_weights: str             # "fp32" or "int8", as the job's programs hold their frozen linears
    num_layers: int               # L of the model
    hidden_size: int              # H
    job_layers: tuple[int, ...]   # the job's trainable layers: these run with LoRA
    target_modules: tuple[str, ...]
    rank: int
    q: int
    batch_size: int               # bs
    seq_len: int                  # T
    layer_b_size: int             # P_l: B entries of one job layer
    b_size: int                   # P: B entries of the whole job (the head's update)
    classes: int                  # C: rows of the head
    methods: tuple[str, ...]
    # The shorter length buckets the layer methods also come at, ascending (`length_method`).
    length_buckets: tuple[int, ...] = ()
    # role -> file name: "weights", "program" (the unit with the head) and, for a probe lowered
    # in several units side by side, "program_2", "program_3", ... (`program_role`)
    files: dict[str, str] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)  # file name -> sha256 hex
    lower_seconds: float = 0.0    # export and lowering time when it was built (0 from the cache)
    cache_key: str = ""
    format: int = PROBE_FORMAT
    # method -> the .pte (one of the program roles' files) it is in; empty: all in "program"
    method_files: dict[str, str] = field(default_factory=dict)

    def method_file(self, method: str) -> str:
        """The name of the ``.pte`` that holds ``method``."""
        return self.method_files.get(method, self.files.get("program", ""))

    def program_files(self) -> tuple[str, ...]:
        """Every ``.pte`` of the probe, the head's first (a device opens that one first)."""
        names = [self.method_file("head"), *(self.method_file(m) for m in self.methods)]
        return tuple(dict.fromkeys(n for n in names if n))

    @property
    def wide_rows(self) -> int:
        """2q·bs, the rows of a widened layer."""
        return 2 * self.q * self.batch_size

    @property
    def probe_id(self) -> str:
        """The model and the shapes this probe times, as one short hash."""
        shapes = {k: v for k, v in to_plain(self).items()
                  if k not in ("files", "sha256", "lower_seconds", "cache_key", "methods")}
        return hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(to_plain(self), indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = "probe manifest") -> "ProbeManifest":
        """Decode and check a probe manifest.

        Raises:
            InputError: not JSON, another format, a field missing or of the wrong type.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{source}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise InputError(f"{source}: expected a JSON object")
        if data.get("format") != PROBE_FORMAT:
            raise InputError(f"{source}: probe format {data.get('format')!r}, this deftly reads {PROBE_FORMAT} "
                             f"(the probe now times chains of each layer, `shared.probe.CHAINS`); export the probe again and re-profile "
                             f"the devices (`deftly profile`)")
        try:
            manifest = from_plain(cls, data, source)
        except RecordError as exc:
            raise InputError(f"malformed probe manifest: {exc}") from None
        unknown = sorted(m for m in manifest.methods if m != "head" and not _is_probe_method(m, manifest.length_buckets))
        if unknown:
            raise InputError(f"{source}: unknown probe methods {unknown}")
        if list(manifest.length_buckets) != sorted(set(manifest.length_buckets)) or any(
                not 1 <= t < manifest.seq_len for t in manifest.length_buckets):
            raise InputError(f"{source}: length_buckets {list(manifest.length_buckets)} must be distinct lengths "
                             f"below seq_len {manifest.seq_len}, ascending")
        programs = {name for role, name in manifest.files.items() if role.startswith("program")}
        if manifest.files and "program" not in manifest.files:
            raise InputError(f"{source}: names no program (.pte) file")
        if manifest.method_files:
            missing = sorted(set(manifest.methods) - set(manifest.method_files))
            extra = sorted(set(manifest.method_files) - set(manifest.methods))
            if missing or extra:
                wrong = [f"missing {missing}"] * bool(missing) + [f"not among its methods {extra}"] * bool(extra)
                raise InputError(f"{source}: method_files must name every method once: {' '.join(wrong)}")
            strangers = sorted({name for name in manifest.method_files.values() if name not in programs})
            if strangers:
                raise InputError(f"{source}: method_files names {strangers}, which are not among its program files "
                                 f"{sorted(programs)}")
        return manifest

    def save(self, path: Path) -> None:
        path.write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> "ProbeManifest":
        path = Path(path)
        if not path.exists():
            raise InputError(f"{path}: no such probe manifest (export one with `deftly profile`)")
        return cls.from_json(path.read_text(), source=str(path))

    def file(self, role: str, manifest_path: Path) -> Path:
        """Absolute path of a file the manifest names by role."""
        if role not in self.files:
            raise InputError(f"{manifest_path}: the probe names no {role!r} file")
        return Path(manifest_path).parent / self.files[role]


def program_role(unit: int) -> str:
    """The ``files`` role of a probe's ``unit``-th ``.pte`` (0: "program", the one with the head)."""
    return "program" if unit == 0 else f"program_{unit + 1}"


def check_probe_matches(probe: ProbeManifest, *, model_id: str, num_layers: int, q: int, batch_size: int,
                        seq_len: int, base_weights: str, job_layers: tuple[int, ...] | list[int],
                        where: str = "the job", probe_where: str = "the probe") -> None:
    """Refuse a probe that times another model or other shapes than the job's.

    Raises:
        InputError: naming the probe, the job and the first field that differs.
    """
    if probe.model_id != model_id:
        raise InputError(f"{probe_where} probes model {probe.model_id!r}, but {where} trains {model_id!r}; "
                         f"export a probe for this model")
    wanted = {"num_layers": num_layers, "q": q, "batch_size": batch_size, "seq_len": seq_len,
              "base_weights": base_weights, "job_layers": tuple(job_layers)}
    for name, value in wanted.items():
        have = getattr(probe, name)
        if have != value:
            raise InputError(f"{probe_where} (model {probe.model_id!r}) was built for {name} = {have!r}, "
                             f"but {where} has {value!r}; export a probe with the job's shapes")


def _at(name: str, seq_len: int | None) -> str:
    return name if seq_len is None else length_method(name, seq_len)


def layer_cost_s(method_s: dict[str, float], method: str, seq_len: int | None = None) -> float:
    """What one layer of a layer method costs inside a program: the slope between its two chains.

    (t(k₂) − t(k₁)) / (k₂ − k₁) for the method's `CHAINS`, clipped to [MIN_SLOPE_SHARE, 1] ×
    t(k₂) / k₂, so that noise never makes a layer free nor dearer than its longer chain's mean.
    The chains are timed at the full length only: at a shorter bucket (``seq_len``) the cost is
    the full length's scaled by the single calls' ratio, t_{T'}(method) / t_T(method).  A method
    the probe has no chains for (the last layer, or an older probe's) costs its own time.

    Raises:
        KeyError: the method has no time (at that length).
    """
    single = method_s[_at(method, seq_len)]
    if method not in CHAINS:
        return single
    short, long = CHAINS[method]
    names = [chain_method(method, k) for k in (short, long)]
    if not any(name in method_s for name in names):
        return single
    times = [method_s[name] for name in names]  # one chain without the other: KeyError, named
    mean_long = times[1] / long
    slope = min(max((times[1] - times[0]) / (long - short), MIN_SLOPE_SHARE * mean_long), mean_long)
    return float(slope if seq_len is None else slope * single / method_s[method])


def call_cost_s(method_s: dict[str, float], method: str, seq_len: int | None = None) -> float:
    """What one call of a chained layer method costs beyond its layers' work: t(k₁) − k₁ · `layer_cost_s`.

    At a shorter bucket, scaled as `layer_cost_s` is.  0 for a method without chains; never negative.
    """
    if method not in CHAINS or chain_method(method, CHAINS[method][1]) not in method_s:
        return 0.0
    short = CHAINS[method][0]
    full = max(0.0, method_s[chain_method(method, short)] - short * layer_cost_s(method_s, method))
    return full if seq_len is None else full * method_s[_at(method, seq_len)] / method_s[method]


def layer_times(probe: ProbeManifest, method_s: dict[str, float],
                seq_len: int | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """τ(l, bs) and τ(l, 2q·bs) for every layer l of the model, from the probe's method times.

    At the full length T, or with ``seq_len`` at one of the probe's shorter length
    buckets (its ``*_t<T'>`` methods).

    A job layer runs ``layer_bs`` below the block and ``layer_wide`` from it on; a
    layer below the job always runs ``frozen_bs`` (its wide time, never used by a
    block program, is set to ``layer_wide`` so that τ stays monotone); a layer above
    the job runs ``frozen_wide``; the last layer runs ``last_wide`` (only at the
    answer position; it is never run on bs rows, so its τ(bs) is the smaller of the two).
    Each layer costs its method's chain slope (`layer_cost_s`), and each of the two calls a
    program makes into its layers costs what one call costs beyond its layers' work, once:
    a block program's step runs as seven XNNPACK calls (SmolLM2 and the tiny Llama alike,
    every block start): every layer below the block in one, the widened layers with the
    last layer's keys and values in the next, the last layer's answer position in a third,
    the head in four.  So layer 0's τ(bs) carries its method's `call_cost_s` (the call
    below the block), and the last layer costs its own ``last_wide`` call whole: that call
    opens on the keys and values of wide rows, and it stands for the call the widened layers
    share with them.  The head is timed as the programs run it.

    Raises:
        InputError: a method the probe's layers need has no time.
    """
    def named(read, *args) -> float:
        try:
            return read(method_s, *args, seq_len)
        except KeyError as missing:
            raise InputError(f"probe {probe.probe_id}: no time for method {missing.args[0]!r} "
                             f"(measured: {sorted(method_s)})") from None

    def cost(name: str) -> float:
        return named(layer_cost_s, name)

    bs, wide = lay_out_layers(probe, cost, cost("last_wide"))
    if probe.num_layers == 1:  # the one layer is the last: no call below any block
        return bs, wide
    below = named(call_cost_s, "layer_bs" if min(probe.job_layers) == 0 else "frozen_bs")
    first_bs = bs[0] + below
    return (first_bs, *bs[1:]), (max(wide[0], first_bs), *wide[1:])


def lay_out_layers(probe: ProbeManifest, cost: Callable[[str], float],
                   last: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """τ(l, bs) and τ(l, 2q·bs) for every layer from one cost per layer method and the last layer's.

    Which method stands for which layer, and the monotone τ(bs) ≤ τ(2q·bs), as `layer_times` says.
    """
    first, end = min(probe.job_layers), max(probe.job_layers)
    bs, wide = [], []
    for layer in range(probe.num_layers):
        if layer == probe.num_layers - 1:
            below = cost("layer_bs") if layer >= first else cost("frozen_bs")
            bs.append(min(below, last))
            wide.append(last)
        elif layer < first:
            b = cost("frozen_bs")
            bs.append(b)
            wide.append(max(b, cost("layer_wide")))
        elif layer > end:
            w = cost("frozen_wide")
            bs.append(min(cost("layer_bs"), w))
            wide.append(w)
        else:
            b, w = cost("layer_bs"), cost("layer_wide")
            bs.append(min(b, w))  # two timings of the same layer: noise must not break monotonicity
            wide.append(w)
    return tuple(bs), tuple(wide)


def profile_from_probe(probe: ProbeManifest, name: str, measurement: Measurement, memory_bytes: float,
                       link_bytes_per_s: float) -> DeviceProfile:
    """The planner's `DeviceProfile` for a device that ran a probe.

    Args:
        probe: the probe it ran.
        name: the device's name in the fleet.
        measurement: what it measured (method times, spreads, memory terms, facts).
        memory_bytes: M_k, the memory a training program may use there.
        link_bytes_per_s: R_k, its link rate on the whole band.

    Returns:
        A checked, measured profile.

    Raises:
        InputError: a probe method without a time, or a profile field out of range.
    """
    if measurement.probe != probe.probe_id:
        raise InputError(f"device {name!r}: the measurement is of probe {measurement.probe}, not {probe.probe_id}")
    bs, wide = layer_times(probe, measurement.method_s)
    at_lengths = tuple(LengthTimes(t, *layer_times(probe, measurement.method_s, t)) for t in probe.length_buckets)
    if "head" not in measurement.method_s:
        raise InputError(f"device {name!r}: the measurement of probe {probe.probe_id} has no time for the head")
    profile = DeviceProfile(name=name, layer_s_bs=bs, layer_s_wide=wide, head_s=measurement.method_s["head"],
                            memory_bytes=memory_bytes, link_bytes_per_s=link_bytes_per_s, measurement=measurement,
                            at_lengths=at_lengths)
    check_device(profile)
    return profile
