"""From a Hugging Face model to P-RGE training programs (ExecuTorch `.pte`), and back.

Model loading (`models`), tasks and their tokenisation (`tasks`), LoRA-FA
(`lora`), the P-RGE step as a torch module (`prge`), the verbalizer
calibration (`calibration`), SmoothQuant for int8 weights (`smoothing`),
lowering and the program cache (`program`), and applying a trained adapter with
its calibration side-car in plain transformers + peft (`serving`).

May import shared, numpy, torch, transformers, peft, executorch (the exporter),
torchao, safetensors, tqdm and matplotlib; never Qt, `device_agent/` or
`desktop/` (checked by tests/test_import_rules.py).

Importing the package installs two log filters (``export.quiet``) before anything
here can import torchao, directly or through transformers: each drops one known,
meaningless message and lets every other record through.
"""
from export.quiet import install_quiet_filters

install_quiet_filters()
