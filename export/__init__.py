"""From a Hugging Face model to P-RGE training programs (ExecuTorch `.pte`).

May import shared, torch, transformers, peft, executorch (the exporter), torchao,
safetensors, tqdm and matplotlib; never Qt.

Importing the package installs two log filters (``export.quiet``) before anything
here can import torchao, directly or through transformers: each drops one known,
meaningless message and lets every other record through.
"""
from export.quiet import install_quiet_filters

install_quiet_filters()
