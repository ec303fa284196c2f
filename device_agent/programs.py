"""Programs (and probes) from the file store: a directory view per manifest, loaded without re-hashing.

A program arrives as separate files (its manifest, the ``.pte``, the shared
``.ptd`` weights, optionally a ``tokenizer.json``), each stored by sha256.
``device_agent.program.Program`` reads a manifest and the files it names beside
it, so :func:`program_view` links the stored files under those names into
``programs/<manifest sha256>/``. The store verified every file when it arrived,
so the program opens with ``verify=False``: a Pi does not re-hash 500 MB of
weights each round.

Before a program is trusted, :func:`load_program` checks that the ``.pte``'s
``step`` method takes the shapes its manifest claims (batch, length, b, z): a
manifest written for another model or block would otherwise fail deep inside
the runtime, or train the wrong slice. This module imports the runtime (and
with it torch) only inside :func:`load_program` and :func:`measure_device`, so an
idle agent never loads it. A probe program (``device_agent.profile``) gets the same
directory view.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from shared.blocks import program_block
from shared.errors import InputError
from shared.manifest import Manifest
from shared.probe import PROBE_SUFFIX, ProbeManifest
from shared.protocol import ProtocolError
from device_agent.store import FileStore

# Of the memory free when a program loads, the share its resident methods may take (see
# `resident_methods_budget`): a quarter is left to the device's other work and the methods'
# workspaces. SmolLM2 fp32 on lab3's 2.5 GiB phone: ~300 MB held, ~520 MB a method, so
# both of a program's methods stay (budget ~2.1 GB, ~1.7 GB used).
RESIDENT_METHODS_SHARE_OF_FREE = 0.75

log = logging.getLogger("deftly.agent.programs")
REQUIRED_ROLES = ("weights",)  # beside its methods' .pte files, what a device needs; data, lora_a stay on the desktop
MANIFEST_NAME = "program.manifest.json"


def read_manifest(store: FileStore, manifest_sha: str, reader=Manifest.from_json):
    """The stored manifest (a program's ``Manifest``, or with ``reader`` a probe's) with this sha256.

    Raises:
        ProtocolError: unknown_file (not stored), not_a_program (not a manifest).
    """
    path = store.path(manifest_sha)
    try:
        return reader(path.read_text(), source=f"manifest {manifest_sha[:12]}…")
    except UnicodeDecodeError:
        raise ProtocolError(f"manifest {manifest_sha[:12]}…: not text", code="not_a_program") from None
    except InputError as exc:
        raise ProtocolError(str(exc), code="not_a_program") from None


def needed_files(manifest: Manifest, manifest_sha: str) -> list[tuple[str, str]]:
    """(what, file name) of every file a device needs to run the program: one ``.pte`` per method, the weights.

    Raises:
        ProtocolError: not_a_program (the manifest names no method file).
    """
    if not manifest.method_files:
        raise ProtocolError(f"manifest {manifest_sha[:12]}…: names no program (.pte) file", code="not_a_program")
    files = [(f"the file of method {method}", name) for method, name in manifest.method_files.items()]
    files += [(f"the {role} file", manifest.files[role]) for role in REQUIRED_ROLES if role in manifest.files]
    return list({name: (what, name) for what, name in files}.values())


def program_view(store: FileStore, root: Path, manifest_sha: str) -> tuple[Path, Manifest]:
    """``root/<manifest_sha>/`` holding the program's manifest and its stored files under their names.

    Returns:
        (the manifest's path in the view, the manifest).

    Raises:
        ProtocolError: not_a_program (no manifest, or it lacks a .pte), unknown_file
            (a file it needs is not stored: the error names each one).
    """
    manifest = read_manifest(store, manifest_sha)
    return _view(store, root, manifest_sha, MANIFEST_NAME, needed_files(manifest, manifest_sha), manifest.sha256), manifest


def probe_view(store: FileStore, root: Path, manifest_sha: str) -> Path:
    """As :func:`program_view`, for a probe program (``shared.probe.ProbeManifest``); returns its manifest's path."""
    probe = read_manifest(store, manifest_sha, reader=ProbeManifest.from_json)
    if "program" not in probe.files:
        raise ProtocolError(f"probe {manifest_sha[:12]}…: names no program (.pte) file", code="not_a_program")
    needed = [(f"the {role} file", name) for role, name in probe.files.items()]
    return _view(store, root, manifest_sha, f"probe{PROBE_SUFFIX}", needed, probe.sha256)


def _view(store: FileStore, root: Path, manifest_sha: str, manifest_name: str, needed: list[tuple[str, str]],
          sha256: dict[str, str]) -> Path:
    """Link the manifest and the stored files it names into ``root/<manifest_sha>/``; refuse a missing one."""
    missing = []
    for what, name in needed:
        sha = sha256.get(name)
        if sha is None:
            raise ProtocolError(f"manifest {manifest_sha[:12]}…: {what}, {name}, has no sha256", code="not_a_program")
        if not store.has(sha):
            missing.append(f"{name} ({sha[:12]}…)")
    if missing:
        raise ProtocolError(f"program {manifest_sha[:12]}…: the agent does not hold {', '.join(missing)}; "
                            f"send {'it' if len(missing) == 1 else 'them'} first", code="unknown_file")
    view = root / manifest_sha
    view.mkdir(parents=True, exist_ok=True)
    _link(store.path(manifest_sha), view / manifest_name)
    for name, sha in sha256.items():
        if store.has(sha):
            _link(store.path(sha), view / name)
    return view / manifest_name


def _link(source: Path, target: Path) -> None:
    if target.exists():
        return
    try:
        os.link(source, target)  # same file system: no copy, and the view survives the blob's rename
    except OSError:
        os.symlink(source, target)


def files_bytes(view_manifest: Path, manifest: Manifest) -> tuple[int, int]:
    """Sizes of the program's ``.pte`` files (one per method) and its weights (0 without a weights file)."""
    pte = sum((view_manifest.parent / name).stat().st_size for name in set(manifest.method_files.values()))
    weights = manifest.file("weights", view_manifest).stat().st_size if "weights" in manifest.files else 0
    return pte, weights


def measure_device(probe_manifest: Path, name: str, link_bytes_per_s: float, clock, one_thread: bool):
    """``device_agent.profile.measure_profile`` on the calling thread (the compute thread).

    Raises:
        ProtocolError (not_a_program): a probe the runtime cannot run, or altered files.
    """
    from device_agent.profile import measure_profile  # imports torch and the runtime
    from device_agent.program import use_one_compute_thread

    if one_thread:
        use_one_compute_thread()
    try:
        return measure_profile(probe_manifest, name, link_bytes_per_s, clock=clock)
    except InputError as exc:
        raise ProtocolError(str(exc), code="not_a_program") from None


def resident_methods_budget(resident_bytes: float, free_bytes: float) -> float:
    """The memory a program may keep methods resident in: what the process holds plus
    ``RESIDENT_METHODS_SHARE_OF_FREE`` of what is free (the rest is left to the device's other
    work and to the methods' workspaces). One method is always kept, whatever the budget."""
    return resident_bytes + RESIDENT_METHODS_SHARE_OF_FREE * max(free_bytes, 0.0)


def load_program(view_manifest: Path, manifest: Manifest, one_thread: bool,
                 memory_cap_bytes: float | None = None) -> Any:
    """Open the program and check its ``step`` signature against the manifest.

    Args:
        view_manifest: the manifest in its view (:func:`program_view`).
        one_thread: run ExecuTorch's kernels on the calling thread only (a simulated device).
        memory_cap_bytes: the device's memory (a simulated device's cap); None: this
            machine's available memory is what is free.

    Returns:
        A ``device_agent.program.Program`` that keeps its methods (one per length
        bucket) resident within :func:`resident_methods_budget`, so that switching
        lengths does not reload the model.

    Raises:
        ProtocolError: not_a_program (the runtime cannot load it), wrong_model (the
            .pte does not take the shapes its manifest describes).
    """
    # imports torch and the runtime
    from device_agent.program import Program, open_et_program, use_one_compute_thread

    if one_thread:
        use_one_compute_thread()
    weights = manifest.file("weights", view_manifest) if "weights" in manifest.files else None
    try:
        native_program = open_et_program(manifest.method_file("step", view_manifest), weights)
        meta = native_program.method_meta("step")
        takes = {i: tuple(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())}
    except RuntimeError as exc:
        raise ProtocolError(f"program {manifest.method_files['step']}: ExecuTorch cannot load it or its step method "
                            f"({str(exc)[:200]}): not a P-RGE program, or its weights are another export's",
                            code="not_a_program") from None
    span = program_block(manifest)
    claimed = {0: (manifest.batch_size, manifest.seq_len), 3: (manifest.b_size,), 4: (manifest.q, span.size)}
    for index, shape in claimed.items():
        if takes.get(index) != shape:
            raise ProtocolError(f"program {manifest.method_files['step']}: its step takes input {index} of shape "
                                f"{takes.get(index)}, its manifest (model {manifest.model_id}) says {shape}: the "
                                f"manifest was written for another model or block", code="wrong_model")
    del native_program
    import psutil

    process = psutil.Process()
    resident = float(process.memory_info().rss)
    free = (memory_cap_bytes - resident) if memory_cap_bytes is not None else float(psutil.virtual_memory().available)
    try:
        return Program(view_manifest, verify=False, memory_budget_bytes=resident_methods_budget(resident, free),
                       resident_bytes=lambda: float(process.memory_info().rss))
    except InputError as exc:
        raise ProtocolError(str(exc), code="not_a_program") from None
