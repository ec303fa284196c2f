"""The headless agent that runs P-RGE programs on a device.

Imports shared, executorch.runtime, websockets, zeroconf, psutil and numpy only:
never Qt, transformers, peft or the exporter.  Public entry points for other
packages: `device_agent.trainer` (the local training loop).
"""
