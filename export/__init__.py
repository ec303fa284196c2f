"""From a Hugging Face model to P-RGE training programs (ExecuTorch `.pte`).

May import shared, torch, transformers, peft and executorch.exir; never Qt.
"""
