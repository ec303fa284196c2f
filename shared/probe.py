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
* ``layer_bs_pair``: (h [bs, T, H], b [1, P_l]) -> h [bs, T, H]: the same job layer twice in one
  call.  Two ``layer_bs`` calls minus one pair is what a call costs beyond its layer's work
  (the runtime's and XNNPACK's set-up of a call; `deftly bench profile` records it per machine,
  `call_overhead_s` in bench/results/profile.json): a program pays it once a step, the probe
  once a layer, so `layer_times` takes it off every layer and leaves it on the head;
* ``frozen_bs``, ``frozen_wide``: (h [n, T, H]) -> h [n, T, H]: a layer outside the job (no LoRA),
  present only when the model has such layers below (``frozen_bs``) or above (``frozen_wide``) the job;
* ``last_wide``: (h [2q·bs, T, H], positions [2q·bs], b [2q, P_l]) -> [2q·bs, H]: the last
  layer at the answer position (``b`` is read only when the last layer is a job layer);
* ``head``: (h [2q·bs, H], labels [bs], b [P], z [q, P], lr [1], eps [1])
  -> (b_new [P], loss [1], g [q], b_copies [2q, P]).

Every method but the head also comes at each of the job's shorter length
buckets T' (`ProbeManifest.length_buckets`), named as the programs name theirs:
``layer_wide_t32`` is ``layer_wide`` with T' = 32 in place of T.  A device's
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

from shared.errors import InputError
from shared.profiles import PROBE_FORMAT, DeviceProfile, LengthTimes, Measurement, check_device
from shared.records import RecordError, from_plain, to_plain

# PROBE_FORMAT (bump when the probe's methods or their signatures change) lives in
# shared.profiles, which records it in each measurement.
PROBE_SUFFIX = ".probe.json"
PAIR_METHOD = "layer_bs_pair"
LAYER_METHODS = ("layer_bs", PAIR_METHOD, "layer_wide", "frozen_bs", "frozen_wide", "last_wide")


def length_method(method: str, seq_len: int) -> str:
    """A layer method at a shorter length bucket: ``layer_wide`` at 32 -> ``layer_wide_t32``."""
    return f"{method}_t{seq_len}"


def split_length_method(name: str) -> tuple[str, int | None]:
    """``layer_wide_t32`` -> (``layer_wide``, 32); a full-length method -> (name, None)."""
    head, _, tail = name.rpartition("_t")
    if head in LAYER_METHODS and tail.isdigit():
        return head, int(tail)
    return name, None


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
    files: dict[str, str] = field(default_factory=dict)   # role ("program", "weights") -> file name
    sha256: dict[str, str] = field(default_factory=dict)  # file name -> sha256 hex
    lower_seconds: float = 0.0    # export and lowering time when it was built (0 from the cache)
    cache_key: str = ""
    format: int = PROBE_FORMAT

    @property
    def method_files(self) -> dict[str, str]:
        """Method -> its own ``.pte``, as programs have: none, every method is in the one ``program`` file."""
        return {}

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
                             f"(the probe now times every length bucket); export the probe again and re-profile "
                             f"the devices (`deftly profile`)")
        try:
            manifest = from_plain(cls, data, source)
        except RecordError as exc:
            raise InputError(f"malformed probe manifest: {exc}") from None
        unknown = sorted(m for m in manifest.methods if m != "head" and not (
            split_length_method(m)[0] in LAYER_METHODS
            and split_length_method(m)[1] in (None, *manifest.length_buckets)))
        if unknown:
            raise InputError(f"{source}: unknown probe methods {unknown}")
        if list(manifest.length_buckets) != sorted(set(manifest.length_buckets)) or any(
                not 1 <= t < manifest.seq_len for t in manifest.length_buckets):
            raise InputError(f"{source}: length_buckets {list(manifest.length_buckets)} must be distinct lengths "
                             f"below seq_len {manifest.seq_len}, ascending")
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


# A pair that seems to save more than this share of a layer's call is noise, not overhead.
MAX_OVERHEAD_SHARE = 0.5


def call_overhead_s(method_s: dict[str, float], seq_len: int | None = None) -> float:
    """What one probe method call costs beyond its layer's work: 2·t(layer_bs) − t(layer_bs_pair).

    At the full length, or with ``seq_len`` at a shorter bucket.  Clipped to
    [0, MAX_OVERHEAD_SHARE · the quickest layer method's time], so that noise never makes
    a layer free; 0 when the probe has no pair method.
    """
    def at(name: str) -> str:
        return name if seq_len is None else length_method(name, seq_len)

    if at("layer_bs") not in method_s or at(PAIR_METHOD) not in method_s:
        return 0.0
    quickest = min(method_s[at(m)] for m in LAYER_METHODS if m != PAIR_METHOD and at(m) in method_s)
    return float(min(max(0.0, 2 * method_s[at("layer_bs")] - method_s[at(PAIR_METHOD)]),
                     MAX_OVERHEAD_SHARE * quickest))


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
    Each method's time is taken less one call's own cost (`call_overhead_s`): a program
    runs all its layers in one call.

    Raises:
        InputError: a method the probe's layers need has no time.
    """
    def time_of(name: str) -> float:
        name = name if seq_len is None else length_method(name, seq_len)
        if name not in method_s:
            raise InputError(f"probe {probe.probe_id}: no time for method {name!r} (measured: {sorted(method_s)})")
        return method_s[name] - overhead

    overhead = call_overhead_s(method_s, seq_len)

    first, last = min(probe.job_layers), max(probe.job_layers)
    bs, wide = [], []
    for layer in range(probe.num_layers):
        if layer == probe.num_layers - 1:
            w = time_of("last_wide")
            below = time_of("layer_bs") if layer >= first else time_of("frozen_bs")
            bs.append(min(below, w))
            wide.append(w)
        elif layer < first:
            b = time_of("frozen_bs")
            bs.append(b)
            wide.append(max(b, time_of("layer_wide")))
        elif layer > last:
            w = time_of("frozen_wide")
            bs.append(min(time_of("layer_bs"), w))
            wide.append(w)
        else:
            b, w = time_of("layer_bs"), time_of("layer_wide")
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
