"""The operator's side: the `deftly` command line (`cli`), the benchmarks (`bench`)
and the training report (`report`). The fleet engine and the Qt dashboard are
being built (issues 21 and 22).

May import shared, export, numpy, tqdm, matplotlib, websockets, zeroconf, and of
the device agent only its public `device_agent.trainer` and `device_agent.program`;
torch only under `desktop/bench/`, PySide6 and pyqtgraph only under `desktop/ui/`
(checked by tests/test_import_rules.py).
"""
