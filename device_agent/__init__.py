"""The headless agent that runs P-RGE programs on a device.

Imports shared, ExecuTorch's native runtime extension (with torch as its tensor type),
websockets, zeroconf, psutil and numpy only:
never Qt, transformers, peft or the exporter.  Public entry points for other
packages: `device_agent.trainer` (the local training loop).
"""
