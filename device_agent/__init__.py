"""What runs on a device: an exported P-RGE program loaded with ExecuTorch's runtime
(`program`), the step-by-step trainer with its checkpoints and PEFT adapter
(`trainer`) and the probe's profiler (`profile`), the modules other packages may
use; and the agent, `deftly-agent` (`cli`): `server` (the WebSocket endpoint and
rounds), `store` (files by sha256), `outbox` (metrics until acknowledged),
`rounds` (the trainer a round at a time, checkpointed), `programs`, `data`,
`tokenizer`, `advert`, `simulate`, `identity`.

Imports shared and exactly the packages of the `agent` extra in pyproject.toml:
numpy, psutil, websockets, zeroconf, safetensors, tokenizers (a private text
file, tokenised on the device), torch (only as the runtime's tensor type) and
ExecuTorch's native extension `executorch.extension.pybindings` (never
`executorch.exir` or `executorch.runtime`, which pull in the exporter).
Never Qt, transformers, peft or `export/` (checked by tests/test_import_rules.py).
"""
