"""One exported P-RGE program, loaded with the ExecuTorch runtime and called with numpy.

A program is a set of files beside its manifest (see `shared.manifest`): a
`.pte` per method, the shared base weights `.ptd`, the tokenised task `.npz` and
(with eval) the frozen A's `.npz`. `Program` checks every file's sha256 against the
manifest before it loads anything (a program that was cut short in transfer, or
edited, must not train silently), then exposes the methods as numpy in / numpy out:

    step(input_ids, lengths, labels, b, z, lr, eps) -> (b_blk_new, loss, g)
    class_logits(input_ids, lengths, b)             -> logits [n, C], any n

A program trains one *block* of its job's adapter (``Program.block``, a
``shared.blocks.BlockSpan``): ``step`` takes the job's global ``b`` [P] and
directions ``z`` [q, P_blk] on the block, and returns the block's new slice
[P_blk]; a single-device program's block is every trainable layer (P_blk = P).

torch appears only as the runtime's tensor type: executorch depends on it, and
`torch.from_numpy` shares memory rather than copying.

Memory: XNNPACK packs the frozen weights into its own layout once per *loaded
method*, and ExecuTorch 1.5.1's Python bindings cannot switch on the backend's
shared weight cache. Measured on SmolLM2 (538 MB of fp32 weights): each loaded
method adds ~520 MB of resident memory (step_t32 884 MB, + step 1,402 MB,
+ eval 1,920 MB). ``max_resident_methods`` bounds that: each method is loaded
through its own ExecuTorch program object, and loading one more than the bound
releases the least recently used (releasing step and eval took the process from
1,920 MB back to 1,039 MB; loading a method again costs 0.3-1.1 s).

That reload is dear where it recurs: a training program has one method per length
bucket (``step``, ``step_t32``), and the trainer switches between them every few
batches. With one method resident each switch reloads and repacks the whole
model (measured on SmolLM2, one thread: a T=32 step of 0.25 s took 0.51-0.69 s
after a switch, a T=64 step of 0.44 s took 0.79-0.80 s). ``memory_budget_bytes``
keeps methods resident while the process, plus the largest method loaded so far,
stays within the budget, and releases the least recently used only when it would
not: a device with memory to spare pays each method's load once.

The runtime is reached through its native extension, not `executorch.runtime`:
that module's import chain runs `executorch.exir`'s package init, which pulls in
the whole exporter (2,900 modules, torchao among them) and costs a device
136 MB of resident memory before any program is loaded (measured: 362 MB vs
226 MB after the import). A device only runs programs; see `open_et_program`.
"""
from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from shared.blocks import BlockSpan, check_global_b, program_block
from shared.errors import InputError
from shared.hashing import sha256_file
from shared.manifest import Manifest
from shared.probe import ProbeManifest
from shared.task_data import Split, load_splits

MANIFEST_SUFFIX = ".manifest.json"


def resolve_manifest_path(path: Path) -> Path:
    """The manifest of a program given as its ``.pte`` or its ``.manifest.json``.

    Raises:
        InputError: the path is neither, or the manifest does not exist.
    """
    path = Path(path)
    if path.name.endswith(MANIFEST_SUFFIX):
        manifest_path = path
    elif path.suffix == ".pte":
        manifest_path = path.with_name(path.name[:-len(".pte")] + MANIFEST_SUFFIX)
    else:
        raise InputError(f"{path}: expected a program (.pte) or its manifest ({MANIFEST_SUFFIX})")
    if not manifest_path.exists():
        if path.suffix == ".pte" and not path.exists():
            raise InputError(f"{path}: no such program")
        raise InputError(f"{manifest_path}: no such manifest (export the program with `deftly export`)")
    return manifest_path


def verify_files(manifest: Manifest | ProbeManifest, manifest_path: Path) -> None:
    """Check that every file the manifest names exists beside it with the recorded sha256.

    Raises:
        InputError: naming the first file that is absent, unlisted, or has another hash.
    """
    # a program's manifest and a probe's (shared.probe.ProbeManifest) both name their .pte per method
    named = [(f"the {role} file", name) for role, name in manifest.files.items()]
    named += [(f"the file of method {method}", name) for method, name in manifest.method_files.items()]
    for what, name in named:
        if name not in manifest.sha256:
            raise InputError(f"{manifest_path}: {what}, {name}, has no sha256 in the manifest")
    for name, expected in manifest.sha256.items():
        path = manifest_path.parent / name
        if not path.is_file():
            raise InputError(f"{path}: missing (listed in {manifest_path.name}; copy every file the export wrote)")
        actual = sha256_file(path)
        if actual != expected:
            raise InputError(f"{path}: sha256 {actual[:12]}… does not match the manifest's {expected[:12]}… "
                             f"(the file is corrupt or from another export)")


def _tensor(array: np.ndarray, dtype: np.dtype, shape: tuple[int, ...], what: str) -> torch.Tensor:
    array = np.asarray(array)
    if array.shape != shape:
        raise InputError(f"{what}: shape {array.shape}, the program takes {shape}")
    array = np.ascontiguousarray(array, dtype=dtype)
    if not array.flags.writeable:  # torch.from_numpy warns on read-only memory
        array = array.copy()
    return torch.from_numpy(array)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    # Copy: an output may live in the method's planned memory, which the method's next call overwrites.
    return tensor.detach().numpy().copy()


def open_et_program(program_path: Path, weights_path: Path | None):
    """Open a ``.pte`` (and its ``.ptd``) with ExecuTorch's native extension.

    ``executorch.runtime.Runtime.load_program`` makes the same call; importing the
    extension directly skips the exporter that ``executorch.runtime`` imports.
    torch must be loaded first: the extension links against libtorch.

    Returns:
        The native program; ``load_method(name)`` gives a method, called with a list of tensors.
    """
    import executorch.extension.pybindings._C as native

    return native._load_program(str(program_path), enable_etdump=False, debug_buffer_size=0,
                                program_verification=native.Verification.InternalConsistency,
                                data_path=None if weights_path is None else str(weights_path))


def use_one_compute_thread() -> None:
    """Run ExecuTorch's kernels on the calling thread alone (ExecuTorch 1.5.1's pybindings; see simulate.py)."""
    import torch  # noqa: F401  the extension links against libtorch: torch loads first
    import executorch.extension.pybindings._C as native

    native._unsafe_reset_threadpool(1)


def return_freed_memory() -> None:
    """Hand the heap's freed pages back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    A released method frees its packed weights, but glibc keeps most of that heap
    and the next method packs into fresh pages beside it, so each swap raised the
    peak (SmolLM2 int8: 486 → 534 MiB over three swaps).
    """
    malloc_trim = _malloc_trim()
    if malloc_trim is not None:
        malloc_trim(0)


@functools.cache
def _malloc_trim():
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim  # the process's own symbols: libc's, where it is glibc
    except (AttributeError, OSError):
        return None


class Program:
    """A verified P-RGE program with its ``step`` and ``eval`` methods.

    Attributes:
        manifest: what the program computes and how to call it.
        manifest_path: where the manifest was read from; the other files sit beside it.
    """

    def __init__(self, path: Path, verify: bool = True, max_resident_methods: int | None = None,
                 job_key: str | None = None, memory_budget_bytes: float | None = None,
                 resident_bytes: Callable[[], float] | None = None) -> None:
        """Load the program a ``.pte`` or ``.manifest.json`` path names.

        Args:
            path: the program's ``.pte`` or its manifest.
            verify: check every file's sha256 first (leave on unless the caller just did).
            max_resident_methods: at most this many methods loaded at once (each
                holds its own packed copy of the weights); None: no bound.
            job_key: refuse a program of any other job (a coordinator's check); None: any job.
            memory_budget_bytes: load one more method only while ``resident_bytes()`` plus the
                largest method's load so far stays within this; otherwise release the least
                recently used first (one method is always kept). None: no budget.
            resident_bytes: the process's resident memory now (needed with a budget).

        Raises:
            InputError: a missing or malformed manifest, a missing or altered file, a
                block outside the manifest's layout, a program of another job.
        """
        self.manifest_path = resolve_manifest_path(path)
        self.manifest = Manifest.load(self.manifest_path)
        if job_key is not None:
            self.manifest.check_job(job_key, str(self.manifest_path))
        self.block: BlockSpan = program_block(self.manifest)  # checked against the layout
        if verify:
            verify_files(self.manifest, self.manifest_path)
        if max_resident_methods is not None and max_resident_methods < 1:
            raise InputError(f"max_resident_methods must be at least 1, got {max_resident_methods}")
        if memory_budget_bytes is not None and resident_bytes is None:
            raise InputError("a memory budget for resident methods needs a way to read resident memory")
        self.max_resident_methods = max_resident_methods
        self.memory_budget_bytes = memory_budget_bytes
        self._resident_bytes = resident_bytes
        self._largest_load_bytes = 0.0  # the most resident memory one method's load took so far
        self._weights_path = (self.manifest.file("weights", self.manifest_path)
                              if "weights" in self.manifest.files else None)
        missing = [m for m in self.manifest.methods if m not in self.manifest.method_files]
        if missing:
            raise InputError(f"{self.manifest_path}: no file holds methods {missing}")
        for name in dict.fromkeys(self.manifest.method_files.values()):
            self._open(self.manifest_path.parent / name)  # fail here, not at the first step, on a file ExecuTorch cannot read
        # method name -> (its own ExecuTorch program, the loaded method), least recently used first.
        self._methods: OrderedDict[str, tuple] = OrderedDict()

    # -- shapes from the manifest ---------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.manifest.batch_size

    @property
    def eval_batch_size(self) -> int:
        return self.manifest.eval_batch_size

    @property
    def seq_len(self) -> int:
        return self.manifest.seq_len

    @property
    def buckets(self) -> list[int]:
        """Sequence lengths with a step method of their own, ascending; the last is seq_len."""
        return sorted(int(t) for t in self.manifest.step_buckets)

    def bucket_for(self, longest: int, buckets: list[int] | None = None) -> int:
        """The shortest bucket that holds a batch whose longest row has ``longest`` tokens.

        Right padding makes the cut exact: positions past every row's length only
        ever hold padding, which no real token attends to.

        Args:
            longest: tokens in the batch's longest row.
            buckets: the lengths to choose from, ascending; default the step buckets.
        """
        for length in self.buckets if buckets is None else buckets:
            if longest <= length:
                return length
        raise ValueError(f"a row of {longest} tokens is longer than the program's {self.seq_len}")

    @property
    def q(self) -> int:
        return self.manifest.q

    @property
    def b_size(self) -> int:
        """P, the length of the job's global b (what ``step`` and ``class_logits`` take)."""
        return self.manifest.b_size

    @property
    def block_size(self) -> int:
        """P_blk, the length of the block's slice (z's width, and what ``step`` returns)."""
        return self.block.size

    @property
    def job_key(self) -> str:
        return self.manifest.job_key

    @property
    def identity(self) -> dict[str, str]:
        """What tells this program from another: its cache key and the sha256 of its method files."""
        names = sorted(set(self.manifest.method_files.values()))
        return {"cache_key": self.manifest.cache_key,
                "program_sha256": hashlib.sha256("".join(self.manifest.sha256.get(n, "") for n in names)
                                                 .encode()).hexdigest()}

    # -- the program's side files ---------------------------------------------------

    def load_data(self) -> dict[str, Split]:
        """The task's tokenised splits ("train", "validation", "test")."""
        return load_splits(self.manifest.file("data", self.manifest_path))

    def load_lora_a(self) -> dict[str, np.ndarray]:
        """The frozen A's, keyed by module path (``BSlot.path``), each [r, in] float32."""
        path = self.manifest.file("lora_a", self.manifest_path)
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name].astype(np.float32) for name in data.files}

    # -- the methods ------------------------------------------------------------------

    @property
    def resident_methods(self) -> list[str]:
        """The methods loaded now, least recently used first."""
        return list(self._methods)

    def _open(self, program_path: Path):
        try:
            return open_et_program(program_path, self._weights_path)
        except RuntimeError as exc:
            raise InputError(f"{program_path}: ExecuTorch could not load the program ({exc})") from None

    def _method(self, name: str):
        if name in self._methods:
            self._methods.move_to_end(name)
            return self._methods[name][1]
        if name not in self.manifest.methods:
            raise InputError(f"{self.manifest_path}: the program has no {name!r} method "
                             f"(it has {self.manifest.methods}); export it with --methods including {name}")
        while self._methods and (self._at_count_bound() or self._over_budget()):
            self._methods.popitem(last=False)  # its program and packed weights go with it
            return_freed_memory()
        before = self._resident_bytes() if self._resident_bytes is not None else 0.0
        # A program object per method: dropping it is how a method is released.
        et_program = self._open(self.manifest.method_file(name, self.manifest_path))
        try:
            method = et_program.load_method(name)
        except RuntimeError as exc:
            raise InputError(f"{self.manifest_path}: ExecuTorch could not load method {name!r} ({exc})") from None
        self._methods[name] = (et_program, method)
        if self._resident_bytes is not None:
            self._largest_load_bytes = max(self._largest_load_bytes, self._resident_bytes() - before)
        return method

    def _at_count_bound(self) -> bool:
        return self.max_resident_methods is not None and len(self._methods) >= self.max_resident_methods

    def _over_budget(self) -> bool:
        """Loading one more method (as large as the largest so far) would pass the memory budget."""
        if self.memory_budget_bytes is None:
            return False
        return self._resident_bytes() + self._largest_load_bytes > self.memory_budget_bytes

    def step(self, input_ids: np.ndarray, lengths: np.ndarray, labels: np.ndarray, b: np.ndarray,
             z: np.ndarray, lr: float, eps: float) -> tuple[np.ndarray, float, np.ndarray]:
        """One P-RGE step on the program's block.

        Args:
            input_ids: [bs, T] int64, right-padded.
            lengths: [bs] int64 real tokens per row.
            labels: [bs] int64 class indices.
            b: [P] float32, the job's global b (every block's B's).
            z: [q, P_blk] float32 directions on the block.
            lr: learning rate of this step.
            eps: perturbation size.

        Returns:
            (b_blk_new [P_blk] float32: the block's new slice, mean loss over the 2q
            copies, g [q] float32). The rest of b is the caller's to keep.

        Raises:
            InputError: a b or z of the wrong size, or inputs of the wrong shape.
        """
        _tensor(input_ids, np.int64, (self.batch_size, self.seq_len), "input_ids")  # checks the full shape
        b = check_global_b(b, self.manifest.b_layout, f"b (the job's global b, {self.manifest_path.name})")
        z = np.asarray(z)
        if z.shape != (self.q, self.block_size):
            raise InputError(f"z: shape {z.shape}, block {self.block.name} takes [{self.q}, {self.block_size}] "
                             f"(q directions over the block's slice of b)")
        T = self.bucket_for(int(np.max(lengths)))
        z_tensor = _tensor(z, np.float32, (self.q, self.block_size), "z")
        return self._run_step(self.manifest.step_buckets[str(T)], np.asarray(input_ids)[:, :T], lengths, labels,
                              b, lr, eps, z_tensor)

    def _run_step(self, method: str, input_ids: np.ndarray, lengths: np.ndarray, labels: np.ndarray,
                  b: np.ndarray, lr: float, eps: float, z: torch.Tensor | None = None):
        """Calls a step method: (input_ids, lengths, labels, b[, z], lr, eps) -> (b_new, loss, g)."""
        bs = self.batch_size
        inputs = [
            _tensor(input_ids, np.int64, (bs, input_ids.shape[1]), "input_ids"),
            _tensor(lengths, np.int64, (bs,), "lengths"),
            _tensor(labels, np.int64, (bs,), "labels"),
            _tensor(b, np.float32, (self.b_size,), "b"),
            *([] if z is None else [z]),
            _tensor(np.array([lr]), np.float32, (1,), "lr"),
            _tensor(np.array([eps]), np.float32, (1,), "eps"),
        ]
        b_new, loss, g = self._method(method)(inputs)
        return _numpy(b_new), float(loss.reshape(-1)[0]), _numpy(g)

    def step_in_graph_noise(self, input_ids: np.ndarray, lengths: np.ndarray, labels: np.ndarray,
                            b: np.ndarray, lr: float, eps: float) -> tuple[np.ndarray, float, np.ndarray]:
        """One P-RGE step with z drawn inside the program (method ``step_rng``).

        For a runtime that cannot draw the directions itself. The draw is the
        program's own, unseeded, so a run built on it cannot be resumed bit-exactly;
        `deftly train` therefore draws z on the host and calls `step`. Always runs
        at the full T (there is no length bucket of this method).

        Returns:
            (b_blk_new [P_blk] float32, mean loss over the 2q copies, g [q] float32).
        """
        _tensor(input_ids, np.int64, (self.batch_size, self.seq_len), "input_ids")  # checks the full shape
        b = check_global_b(b, self.manifest.b_layout, f"b (the job's global b, {self.manifest_path.name})")
        return self._run_step("step_rng", np.asarray(input_ids), lengths, labels, b, lr, eps)

    def loss(self, input_ids: np.ndarray, lengths: np.ndarray, labels: np.ndarray, b: np.ndarray) -> float:
        """Mean loss of one unperturbed forward on a training batch (the optional ``loss`` method).

        What a sequential, MeZO-style step would call 2q times; the benchmark times it.
        """
        bs, T = self.batch_size, self.seq_len
        (loss,) = self._method("loss")([
            _tensor(input_ids, np.int64, (bs, T), "input_ids"),
            _tensor(lengths, np.int64, (bs,), "lengths"),
            _tensor(labels, np.int64, (bs,), "labels"),
            _tensor(b, np.float32, (self.b_size,), "b"),
        ])
        return float(loss.reshape(-1)[0])

    @property
    def eval_buckets(self) -> dict[int, str]:
        """Sequence length -> eval method; only the full length for programs without eval buckets."""
        return {int(t): name for t, name in self.manifest.eval_buckets.items()} or {self.seq_len: "eval"}

    def class_logits(self, input_ids: np.ndarray, lengths: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Class logits for any number of rows, in ``eval_batch_size`` calls.

        Rows are taken shortest first, so that most calls fit a shorter length bucket
        (``eval_t<T>``) and do not pay for padding to the longest; the logits come back
        in the rows' own order.  The last call is padded with copies of its first row
        and the padded rows are dropped.

        Args:
            input_ids: [n, T] int64.
            lengths: [n] int64.
            b: [P] float32.

        Returns:
            [n, C] float32, C = number of classes (``manifest.labels``).
        """
        input_ids, lengths = np.asarray(input_ids), np.asarray(lengths)
        n, ebs = input_ids.shape[0], self.eval_batch_size
        if lengths.shape != (n,):
            raise ValueError(f"lengths: shape {lengths.shape}, expected ({n},) to match input_ids")
        if n and input_ids.shape[1:] != (self.seq_len,):
            raise ValueError(f"input_ids: {input_ids.shape[1:]} tokens per row, expected {self.seq_len}")
        b_tensor = _tensor(b, np.float32, (self.b_size,), "b")
        buckets = self.eval_buckets
        order = np.argsort(lengths, kind="stable")  # shortest first
        logits = np.zeros((n, len(self.manifest.labels)), dtype=np.float32)
        for start in range(0, n, ebs):
            rows = order[start:start + ebs]
            T = self.bucket_for(int(lengths[rows].max()), sorted(buckets))
            ids, lens = input_ids[rows, :T], lengths[rows]
            real = rows.shape[0]
            if real < ebs:  # pad with the first row (any valid row will do): the method's batch is fixed
                ids = np.concatenate([ids, np.repeat(ids[:1], ebs - real, axis=0)])
                lens = np.concatenate([lens, np.repeat(lens[:1], ebs - real)])
            (chunk,) = self._method(buckets[T])([_tensor(ids, np.int64, (ebs, T), "input_ids"),
                                                 _tensor(lens, np.int64, (ebs,), "lengths"), b_tensor])
            logits[rows] = _numpy(chunk)[:real]
        return logits

    def accuracy(self, split: Split, b: np.ndarray, limit: int | None = None,
                 class_bias: np.ndarray | None = None) -> float:
        """Fraction of the first ``limit`` rows of ``split`` (all when None) whose argmax is the label.

        ``class_bias`` ([C]) replaces the program's own calibration bias, as when an adapter
        is served with the calibration another program measured (its ``deftly_calibration.json``).
        """
        n = len(split) if limit is None else min(limit, len(split))
        if n == 0:
            return float("nan")
        logits = self.class_logits(split.input_ids[:n], split.lengths[:n], b)  # [n, C], own bias included
        if class_bias is not None:
            own = np.asarray(self.manifest.class_bias, dtype=np.float32)
            served = np.asarray(class_bias, dtype=np.float32)
            if served.shape != own.shape:
                raise ValueError(f"class_bias: shape {served.shape}, expected {own.shape} (one per class)")
            logits = logits - own + served
        return float((logits.argmax(axis=1) == split.labels[:n]).mean())
