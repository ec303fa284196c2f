"""What runs on a device: an exported P-RGE program loaded with ExecuTorch's runtime
(`program`) and the local training loop with its checkpoints and PEFT adapter
(`trainer`), the two modules other packages may use. The agent's server,
store and advert are being built (issue 20).

Imports shared and exactly the packages of the `agent` extra in pyproject.toml:
numpy, psutil, websockets, zeroconf, safetensors, torch (only as the runtime's
tensor type) and ExecuTorch's native extension `executorch.extension.pybindings`
(never `executorch.exir` or `executorch.runtime`, which pull in the exporter).
Never Qt, transformers, peft or `export/` (checked by tests/test_import_rules.py).
"""
