"""Cost model: what one round costs a device that trains one block.

The formulation (docs/design.md, "Planning"; this docstring is the single
source of truth for the code):

* Blocks b = 1..N are contiguous ranges of trainable layers, listed shallowest
  first.  Block b has payload S_b bytes (its B tensors) and depth s_b, its
  shallowest layer.
* Device k has measured per-layer forward times τ_{k,j}(l, n) for n ∈ {bs, 2q·bs}
  at each sequence length T_j the job's programs run (the full T and its shorter
  length buckets, `DeviceProfile.at_lengths`), a head time h_k (the head reads
  one position per row, so it does not depend on T), usable memory M_k and
  full-band link rate R_k.
* **The step mix.**  A batch runs at the shortest length bucket that holds its
  longest row, so a share w_j of the steps runs at T_j (Σ_j w_j = 1,
  `Job.step_mix`, counted on the devices' training data in the trainer's own
  batch order: `desktop.engine.shards.step_mix`).  The expected step's layer times are

      τ_k(l, n) = Σ_j w_j · τ_{k,j}(l, n)

  (no mix: every step at T).  A device with no times at some T_j the job runs
  falls back to its full-length times there (a pessimistic estimate), and the
  plan's per-device source says so ("at T=64 only", `DeviceProfile.source_for`).
* **Compute, with prefix sharing.**  A device whose block starts at depth d runs
  the layers below d once on bs rows and widens to 2q·bs rows from d on::

      t_step(k, d) = Σ_{l<d} τ_k(l, bs) + Σ_{l≥d} τ_k(l, 2q·bs) + h_k

  and a round costs `K_local · t_step(k, d)`: the expected round, which a round
  matches when its own mix of lengths is near the job's (the trainer's length
  windows are short for that: `device_agent.trainer.BUCKET_WINDOW_BATCHES`).
  Because τ_{k,j}(l, bs) ≤ τ_{k,j}(l, 2q·bs) at every length (checked on input),
  so is their mix, and t_step is non-increasing in d: deeper blocks are cheaper.
* **Memory.**  `m(b) = M(s_b) + 2q · S_b`: the program at the block's depth and
  the 2q perturbed copies of the block's B.  For an exported job M is measured
  (`shared.job_model.MemoryModel`: the runtime, the weights as loaded and
  XNNPACK's packed copy per loaded method, and the workspace of the widest
  layer, which is one wide layer's whenever a full layer runs wide); for a
  hypothetical job it is `memory_base + memory_per_wide_layer · (L − s_b)`,
  which falls with depth.  The measured M need not: a program packs the layers
  below its block as one XNNPACK partition, so a block of the deepest layer can
  peak as high as the shallowest.  Nothing relies on monotone memory: CRUNCH
  falls back to augmenting paths, and the joint solvers and the boundary DP
  take any pattern of fits.
* **Communication.**  A round downloads the global B state (S_tot = Σ_b S_b) and
  uploads the device's own block: `bytes_b = w · (S_tot + S_b)`, where
  w = 4/3 (`B_WIRE_BYTES_PER_BYTE`) because B crosses the wire as base64 text.
  With a share β_k of the link (Σ_k β_k ≤ 1) this takes `bytes_b / (β_k · R_k)`,
  and the desktop and the agent pace the round's frames at β_k · R_k
  (`shared.pacing`), so it does on a link faster than the share too.
* **Round latency.**  `T_k = bytes_b / (β_k R_k) + K_local · t_step(k, s_b)` and
  `T = max over involved devices`, subject to `m(b) ≤ M_k`.

Everything here is pure: profiles and a job in, numpy arrays out.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.profiles import Block, DeviceProfile, Fleet, Job
from shared.protocol_limits import B_WIRE_BYTES_PER_BYTE


@dataclass(frozen=True)
class Costs:
    """The numbers the solvers work on, for K devices and N blocks (shallowest first)."""

    compute_s: np.ndarray     # (K, N) K_local · t_step(k, s_b), seconds per round
    comm_bytes: np.ndarray    # (N,) w · (S_tot + S_b), bytes on the wire per round for block b's device
    rate: np.ndarray          # (K,) R_k, bytes/s at the full band
    memory_need: np.ndarray   # (N,) m(b), bytes
    memory_limit: np.ndarray  # (K,) M_k, bytes

    @property
    def fits(self) -> np.ndarray:
        """(K, N) bool: block b fits in device k's memory."""
        return self.memory_need[None, :] <= self.memory_limit[:, None]

    @property
    def transfer_s(self) -> np.ndarray:
        """(K, N) a_kb = bytes_b / R_k: seconds to move block b's bytes with the whole band."""
        return self.comm_bytes[None, :] / self.rate[:, None]


def layer_times(device: DeviceProfile, layers: int, seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """τ_{k,j}(l, bs) and τ_{k,j}(l, 2q·bs) for l = 0..L-1 at one length, broadcasting a uniform profile.

    Args:
        device: the profile.
        layers: L.
        seq_len: a shorter length bucket T_j; None (or a length the device has no
            times at): its full-length times.

    Returns:
        Two (L,) float arrays, seconds.
    """
    times = device.times_at(seq_len) if seq_len is not None else None
    source = device if times is None else times
    bs = np.broadcast_to(np.asarray(source.layer_s_bs, dtype=float), (layers,))
    wide = np.broadcast_to(np.asarray(source.layer_s_wide, dtype=float), (layers,))
    return bs, wide


def mixed_layer_times(device: DeviceProfile, job: Job) -> tuple[np.ndarray, np.ndarray]:
    """τ_k(l, n) = Σ_j w_j · τ_{k,j}(l, n): the expected step's layer times under the job's step mix.

    Returns:
        Two (L,) float arrays, seconds (the full-length times when the job has no mix).
    """
    if not job.step_mix:
        return layer_times(device, job.layers)
    bs, wide = np.zeros(job.layers), np.zeros(job.layers)
    for length, share in job.step_mix:
        at = None if length == job.seq_len else length  # missing lengths fall back to the full length
        bs_j, wide_j = layer_times(device, job.layers, at)  # (L,), (L,)
        bs, wide = bs + share * bs_j, wide + share * wide_j
    return bs, wide


def _prefix_shared(bs: np.ndarray, wide: np.ndarray, head_s: float) -> np.ndarray:
    """(L+1,) t_step(d) = Σ_{l<d} τ(l, bs) + Σ_{l≥d} τ(l, 2q·bs) + h from (L,) layer times."""
    below = np.concatenate([[0.0], np.cumsum(bs)])                # Σ_{l<d} τ(l, bs)
    above = np.concatenate([np.cumsum(wide[::-1])[::-1], [0.0]])  # Σ_{l≥d} τ(l, 2q·bs)
    return below + above + head_s


def step_times(fleet: Fleet, job: Job) -> np.ndarray:
    """t_step(k, d) for every device k and every depth d = 0..L, under the job's step mix.

    Returns:
        (K, L+1) array, seconds per local step.  Column d is a block starting at layer d.
    """
    out = np.empty((len(fleet.devices), job.layers + 1))
    for k, device in enumerate(fleet.devices):
        out[k] = _prefix_shared(*mixed_layer_times(device, job), device.head_s)
    return out


def length_step_times(device: DeviceProfile, layers: int, seq_len: int | None = None) -> np.ndarray:
    """t_step(d) for d = 0..L of one device with every step at one length (None: the full length).

    What a step at a known length costs, e.g. to price the steps a round actually ran
    (a length the device has no times at falls back to the full length, as in `step_times`).

    Returns:
        (L+1,) seconds per step.
    """
    return _prefix_shared(*layer_times(device, layers, seq_len), device.head_s)


def memory_need(job: Job, first_layer: int, payload_bytes: float) -> float:
    """m(b) in bytes for a block starting at `first_layer` with `payload_bytes` of B.

    Measured jobs carry the program's memory per depth (`Job.memory_at_depth_bytes`,
    `shared.job_model`); hand-written ones the two terms of the module docstring.
    """
    if job.memory_at_depth_bytes:
        return job.memory_at_depth_bytes[first_layer] + 2 * job.q * payload_bytes
    wide_layers = job.layers - first_layer
    return (job.memory_base_bytes + job.memory_per_wide_layer_bytes * wide_layers
            + 2 * job.q * payload_bytes)


def round_bytes(total_payload, block_payload):
    """Bytes on the wire in one round for a block: ``w · (S_tot + S_b)`` (floats or arrays alike)."""
    return B_WIRE_BYTES_PER_BYTE * (total_payload + block_payload)


def block_costs(fleet: Fleet, job: Job, blocks: tuple[Block, ...] | list[Block],
                steps: np.ndarray | None = None) -> Costs:
    """Costs of every (device, block) pair.

    Args:
        fleet: the devices.
        job: the job (L, q, local steps, memory terms).
        blocks: the blocks, shallowest first.
        steps: `step_times(fleet, job)` if already computed (the boundary search reuses it).

    Returns:
        The `Costs` arrays.
    """
    if steps is None:
        steps = step_times(fleet, job)
    depths = np.array([b.first_layer for b in blocks], dtype=int)
    payload = np.array([b.payload_bytes for b in blocks], dtype=float)
    return Costs(
        compute_s=job.local_steps * steps[:, depths],
        comm_bytes=round_bytes(payload.sum(), payload),
        rate=np.array([d.link_bytes_per_s for d in fleet.devices], dtype=float),
        memory_need=np.array([memory_need(job, b.first_layer, b.payload_bytes) for b in blocks]),
        memory_limit=np.array([d.memory_bytes for d in fleet.devices], dtype=float),
    )


def latency(costs: Costs, shares: np.ndarray) -> np.ndarray:
    """T_k for every (device, block) pair under fixed bandwidth shares.

    Args:
        costs: from `block_costs`.
        shares: (K,) β_k; a device with β_k = 0 can take no block.

    Returns:
        (K, N) seconds per round; +inf where the block does not fit or the share is 0.
    """
    shares = np.asarray(shares, dtype=float)
    with np.errstate(divide="ignore"):
        comm = costs.transfer_s / shares[:, None]
    lat = comm + costs.compute_s
    return np.where(costs.fits & (shares[:, None] > 0), lat, np.inf)
