"""Third-party noise: the known messages are dropped where they arise, everything else still shows."""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_exporter_shows_no_known_noise_but_other_warnings() -> None:
    # torchao and ExecuTorch's partitioner imported as an export imports them, in a fresh process
    script = """
import logging
import export.lowering
import torchao
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
logging.getLogger("torchao").warning("Failed to load /somewhere/_C_real_problem.so: it is missing")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "_C_mxfp8" not in done.stderr and "_C_cutlass" not in done.stderr
    assert "is an Enum subclass" not in done.stderr
    assert "Failed to load /somewhere/_C_real_problem.so: it is missing" in done.stderr


def test_lowering_drops_torchs_leafspec_warning_only() -> None:
    from export.quiet import quiet_lowering

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_lowering():
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`",
                          FutureWarning)
            warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
