"""The planner's `Job` from what was exported and measured, not from hand-worked numbers.

`job_from_manifests` reads a job's program manifests (`shared.manifest`: the
adapter's layout gives the payload per layer, the trainable layers, q, bs and
the model's L; block programs give the blocks) and a probe measurement
(`shared.probe`, `device_agent.profile`) for the memory, and returns the
`shared.profiles.Job` the planner takes.  Step times come from each device's
own measured profile (`shared.probe.profile_from_probe`), not from the job.

**Memory model** (`MemoryModel`; bytes of resident memory a program adds to an
idle agent).  Built from programs' peak RSS beside the probe's terms on a tiny
Llama (4 layers, hidden 512, T 64) and SmolLM2; docs/planner.md has the table
of predicted beside measured (within 6 %):

* *runtime*: opening the first program and its first call (thread pool and
  XNNPACK set-up): the probe's ``open_bytes`` plus the ``run_bytes`` of its
  first method (``head``, whose own work is tiny); ~28 MiB on x86, paid once.
* *weights as loaded*: the frozen weights XNNPACK does not pack (the embedding
  table, fp32 or int8 rows), held by each loaded method: the job's weights file
  less one probe weights file per layer (the probe holds one layer).
* *packed copy*: XNNPACK packs every delegated layer's weights when a method
  loads, once per loaded method: L × the median of the probe's single-layer methods'
  ``load_bytes``.  Each of them packs the same one layer; what sets them apart is the
  allocator (SmolLM2 int8, probe format 4: 3.73, 3.73, 4.42 and 3.74 MB, the 4.42 after
  the chains had loaded), and the largest, taken ×44 while the layers below a block
  load, had put every block 30–40 MiB high.
* *workspace*: XNNPACK's activations, one workspace per loaded method, reused
  layer to layer: the largest of the probe's layer methods that the program runs
  (``layer_wide`` when any full layer runs on 2q·bs rows; for a block of the last
  layer only, the larger of ``layer_bs`` and ``last_wide``).  It does *not* grow
  with the number of widened layers: programs widening 1, 2 and 4 layers of the
  tiny model peaked at 180.6, 195.0 and 193.6 MiB (fp32).
* *the peak while loading*: XNNPACK packs a partition's weights before it frees
  their source, so while the partition loads both are resident (the probe's layer
  methods peak at twice their final load_bytes).  A program's partitions are the
  layers below the block, the widened layers and the last layer (read from the
  SmolLM2 top-8 program's delegates: 297, 95 and 14 MB of weights), so loading
  the 22 layers below the top 8 peaks at 44 layers' worth: SmolLM2 fp32's step
  method peaked at 736.5 MiB while loading and settled at 601.6 after its first
  call (the model: 749 and 601).

With ``resident_methods`` methods loaded at once (the trainer's bound, default
1), the last three terms count that many times: loading a second method of the
tiny fp32 program took it from 193 to 358 MiB.  Each method's workspace is
taken at the full sequence length (shorter buckets need less).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Sequence

from shared.blocks import check_cover, layout_layers, program_block, whole_span
from shared.errors import InputError
from shared.manifest import Manifest
from shared.probe import ProbeManifest, check_probe_matches, split_method
from shared.profiles import Block, Job, Measurement, check_job

BYTES_PER_B = 4  # B is float32 on the wire and in the programs


@dataclass(frozen=True)
class MemoryModel:
    """A program's peak resident memory above the idle agent, from measured terms (bytes)."""

    runtime_bytes: float         # opening the first program and its first call, once
    weights_loaded_bytes: float  # frozen weights outside XNNPACK (the embedding), per loaded method
    packed_layer_bytes: float    # XNNPACK's packed copy of one decoder layer, per loaded method
    workspace_bs_bytes: float    # XNNPACK workspace of a method whose widest layer runs on bs rows
    workspace_wide_bytes: float  # ... of a method with a full layer on 2q·bs rows
    workspace_last_bytes: float  # ... of the last layer at the answer position on 2q·bs rows
    layers: int                  # L, the decoder layers a method packs
    resident_methods: int = 1    # methods loaded at once

    def workspace_bytes(self, first_layer: int) -> float:
        """XNNPACK's workspace of a method whose block starts at ``first_layer``: its widest layer's."""
        if first_layer < self.layers - 1:
            return max(self.workspace_wide_bytes, self.workspace_last_bytes)
        return max(self.workspace_bs_bytes, self.workspace_last_bytes)  # only the last layer runs wide

    def load_layers(self, first_layer: int) -> int:
        """The most layers' weights resident while a method loads, in units of one layer's.

        A method's layers fall into three XNNPACK partitions, in order: the layers below
        the block (bs rows), the widened layers, the last layer.  A partition packs all
        its weights before it frees their source, so while partition k loads, the
        packed weights of the partitions before it, its own packed weights and its
        source are resident together: max over k of Σ_{j<k} n_j + 2 n_k.
        """
        sizes = [n for n in (first_layer, self.layers - 1 - first_layer, 1) if n > 0]
        return max(sum(sizes[:k]) + 2 * n for k, n in enumerate(sizes))

    def program_bytes(self, first_layer: int) -> float:
        """M(d): the peak of a block program whose block starts at layer ``first_layer``.

        Without its 2q B copies.  The larger of the peak while its method loads and
        the resident memory once it has run (weights, packed layers, workspace).
        """
        loading = self.load_layers(first_layer) * self.packed_layer_bytes
        running = self.layers * self.packed_layer_bytes + self.workspace_bytes(first_layer)
        resident = self.weights_loaded_bytes + running  # one loaded method after its first call
        return (self.runtime_bytes + (self.resident_methods - 1) * resident
                + self.weights_loaded_bytes + max(loading, running))

    def at_depths(self) -> tuple[float, ...]:
        """M(d) for d = 0..L-1 (`Job.memory_at_depth_bytes`)."""
        return tuple(self.program_bytes(d) for d in range(self.layers))


def memory_model(probe: ProbeManifest, measurement: Measurement, weights_file_bytes: float,
                 probe_weights_file_bytes: float, resident_methods: int = 1) -> MemoryModel:
    """The memory model of a job's programs from one probe measurement.

    Args:
        probe: the probe that was measured (its shapes must be the job's).
        measurement: the measurement (`DeviceProfile.measurement`), with the memory terms.
        weights_file_bytes: size of the job's shared weights file (``.ptd``).
        probe_weights_file_bytes: size of the probe's weights file (one layer).
        resident_methods: methods a device keeps loaded at once.

    Raises:
        InputError: the measurement is of another probe, or lacks a method's memory.
    """
    if measurement.probe != probe.probe_id:
        raise InputError(f"the measurement is of probe {measurement.probe} (model {measurement.model_id!r}), "
                         f"not of probe {probe.probe_id} (model {probe.model_id!r})")
    if resident_methods < 1:
        raise InputError(f"resident_methods must be at least 1, got {resident_methods}")
    memory = measurement.memory
    # The full-length layer methods: a program's peak is its full-length method's (the
    # shorter buckets' ``*_t<T>`` methods pack the same weights and need less workspace).
    # The chains (the layer k times, for a layer's cost in a program) pack their one layer up to
    # k times as XNNPACK pleases: they are left out, the others each run the layer once.
    layer_methods = [m for m in probe.methods if m != "head" and split_method(m)[1:] == (1, None)]
    missing = [m for m in probe.methods if m not in memory.load_bytes or m not in memory.run_bytes]
    if missing:
        raise InputError(f"the measurement of probe {probe.probe_id} has no memory for methods {missing}")
    bs_methods = [m for m in layer_methods if m.endswith("_bs")]
    wide_methods = [m for m in layer_methods if m in ("layer_wide", "frozen_wide")]
    return MemoryModel(
        runtime_bytes=memory.open_bytes + memory.run_bytes.get("head", 0.0),
        weights_loaded_bytes=max(0.0, weights_file_bytes - probe.num_layers * probe_weights_file_bytes),
        packed_layer_bytes=float(statistics.median(memory.load_bytes[m] for m in layer_methods)),
        workspace_bs_bytes=max(memory.run_bytes[m] for m in bs_methods),
        workspace_wide_bytes=max(memory.run_bytes[m] for m in wide_methods),
        workspace_last_bytes=memory.run_bytes["last_wide"],
        layers=probe.num_layers, resident_methods=resident_methods)


def _is_step(method: str) -> bool:
    """``step``, a length bucket of it (``step_t32``) or ``step_rng``: what a device trains with."""
    return method in ("step", "step_rng") or (method.startswith("step_t") and method[len("step_t"):].isdigit())


def _same_job(manifests: Sequence[Manifest], sources: Sequence[str]) -> None:
    """Every manifest must be a program of one job: same model, adapter layout and shapes."""
    first = manifests[0]
    for manifest, source in zip(manifests[1:], sources[1:]):
        if manifest.job_key and first.job_key:
            manifest.check_job(first.job_key, where=source)
        for name in ("model_id", "num_layers", "q", "batch_size", "seq_len", "base_weights", "b_layout",
                     "target_modules", "rank"):
            if getattr(manifest, name) != getattr(first, name):
                raise InputError(f"{source}: a program of another job ({name} is {getattr(manifest, name)!r}, "
                                 f"but {sources[0]} has {getattr(first, name)!r})")


def job_from_manifests(manifests: Sequence[Manifest], memory: MemoryModel, local_steps: int, name: str = "",
                       probe: ProbeManifest | None = None, sources: Sequence[str] = (),
                       step_mix: Sequence[tuple[int, float]] = ()) -> Job:
    """The planner's job for exported programs.

    One whole-job program (its block is every trainable layer): the planner chooses
    the blocks.  Block programs (each manifest's ``block``): their blocks, checked to
    cover the job's layers exactly once.  Programs without a step method (the job's
    eval program) are passed over.

    Args:
        manifests: the job's program manifests.
        memory: from `memory_model`.
        local_steps: K_local, steps per device per round.
        name: the job's name (default: model and layers).
        probe: the probe the memory (and the fleet's times) came from; checked against the job.
        sources: how to name each manifest in errors (e.g. its path).
        step_mix: the share of steps at each length, (T', share) pairs summing to 1, as the
            desktop counts them on the devices' data (`desktop.engine.shards.step_mix`);
            () = every step at the programs' full length.

    Raises:
        InputError: manifests of different jobs, blocks that overlap or leave layers out,
            non-contiguous or uneven trainable layers, a probe for another model or shapes.
    """
    if not manifests:
        raise InputError("no program manifests: a job needs at least one")
    sources = list(sources) or [f"manifest[{i}]" for i in range(len(manifests))]
    _same_job(manifests, sources)
    first = manifests[0]
    layers = layout_layers(first.b_layout)
    if layers != list(range(layers[0], layers[-1] + 1)):
        raise InputError(f"{sources[0]}: trainable layers {layers} are not contiguous; blocks need a contiguous range")
    sizes = {layer: sum(s.size for s in first.b_layout if s.layer == layer) for layer in layers}
    if len(set(sizes.values())) != 1:
        raise InputError(f"{sources[0]}: layers carry different B sizes {sizes}; the planner needs one size per layer")
    if probe is not None:
        check_probe_matches(probe, model_id=first.model_id, num_layers=first.num_layers, q=first.q,
                            batch_size=first.batch_size, seq_len=first.seq_len, base_weights=first.base_weights,
                            job_layers=layers, where=sources[0], probe_where=f"probe {probe.probe_id}")
    if memory.layers != first.num_layers:
        raise InputError(f"the memory model is of a {memory.layers}-layer model, {sources[0]} has {first.num_layers}")
    blocks: tuple[Block, ...] = ()
    whole = whole_span(first.b_layout)
    spans = [program_block(m) for m in manifests if any(_is_step(method) for method in m.methods)]
    if not spans and len(manifests) == 1 and program_block(first) == whole:
        spans = [whole]  # the job's whole-job eval program describes the job as well: the planner chooses the blocks
    if not spans:
        raise InputError(f"{', '.join(sources)}: no step method; give the job's step programs, not only its eval")
    if not (len(spans) == 1 and spans[0] == whole):  # one whole-job program: the planner chooses the blocks
        if whole in spans:
            raise InputError("mix of block programs and whole-job programs: give the job's block programs only")
        spans.sort(key=lambda span: span.first_layer)
        check_cover(first.b_layout, spans)
        blocks = tuple(Block(span.name, span.first_layer, span.last_layer, float(BYTES_PER_B * span.size))
                       for span in spans)
    job = Job(name=name or f"{first.model_id} layers {layers[0]}-{layers[-1]}", layers=first.num_layers,
              trainable_first=layers[0], trainable_last=layers[-1],
              layer_payload_bytes=float(BYTES_PER_B * sizes[layers[0]]), q=first.q, bs=first.batch_size,
              local_steps=local_steps, memory_base_bytes=0.0, memory_per_wide_layer_bytes=0.0,
              blocks=blocks, memory_at_depth_bytes=memory.at_depths(), seq_len=first.seq_len,
              step_mix=tuple((int(t), float(w)) for t, w in step_mix))
    check_job(job)
    return job
