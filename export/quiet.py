"""Third-party noise, filtered exactly where it arises, so a user sees deftly's output and real problems.

Each filter names one message that is known to say nothing to a deftly user; every
other warning or log record of the same library still reaches the terminal:

* torchao's import tries every bundled kernel library and logs "Failed to load ..."
  for each one this machine cannot load: the CUDA-only ones (``_C_mxfp8``,
  ``_C_cutlass_*``) on a CPU build, never used here;
* torch's pytree logs, once per enum torchao registers, that registering an Enum is
  deprecated (torchao's business, not the user's);
* lowering deep-copies exported programs, and each copy of a pytree spec raises
  torch's FutureWarning that ``isinstance(treespec, LeafSpec)`` is deprecated, from
  inside ExecuTorch (22 times for one small program).
"""
from __future__ import annotations

import contextlib
import logging
import re
import warnings
from typing import Iterator

_CUDA_ONLY_KERNELS = re.compile(r"^Failed to load .*_C_(mxfp8|cutlass_\w+)[.\w-]*\.so\b")
_ENUM_REGISTRATION = re.compile(r"is an Enum subclass and is now natively supported by torch\.compile")
_LEAF_SPEC_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


class _DropMatching(logging.Filter):
    """Drops the records whose message matches one pattern."""

    def __init__(self, pattern: re.Pattern) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def install_log_filter(logger_name: str, pattern: re.Pattern) -> None:
    """Drop ``logger_name``'s records whose message matches ``pattern`` (installed once)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMatching) and f.pattern is pattern for f in logger.filters):
        logger.addFilter(_DropMatching(pattern))


def install_quiet_filters() -> None:
    """The two log filters, before torchao is imported (by us, ExecuTorch or transformers)."""
    install_log_filter("torchao", _CUDA_ONLY_KERNELS)
    install_log_filter("torch.utils._pytree", _ENUM_REGISTRATION)


def import_torchao_quietly() -> None:
    """Import torchao (which ExecuTorch's exporter imports too) without its two known messages."""
    install_quiet_filters()
    import torchao  # noqa: F401


@contextlib.contextmanager
def quiet_lowering() -> Iterator[None]:
    """Inside: torch.export and ExecuTorch lowering without torch's LeafSpec FutureWarning."""
    import_torchao_quietly()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_LEAF_SPEC_DEPRECATION, category=FutureWarning)
        yield
