"""The headless agent that runs P-RGE programs on a device.

Imports shared, ExecuTorch's native runtime extension (with torch as its tensor type),
websockets, zeroconf, psutil, numpy and safetensors, and `tokenizers` when it tokenises
a private text file: never Qt, transformers, peft or the exporter. Public entry points
for other packages: `device_agent.trainer` (the step-by-step trainer and `deftly train`'s
loop), `device_agent.program` and `device_agent.profile` (the probe's profiler). The agent program itself is `deftly-agent`
(`device_agent.cli`); its parts: `server` (the WebSocket endpoint and rounds), `store`
(files by sha256), `outbox` (metrics until acknowledged), `rounds` (the trainer a round
at a time, checkpointed), `programs`, `data`, `tokenizer`, `advert`, `simulate`, `identity`; `host` runs several agents in one
process (`deftly bench scale`).
"""
