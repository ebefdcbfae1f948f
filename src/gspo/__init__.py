"""gspo: Group Sequence Policy Optimization for Hugging Face causal language models."""

import os

from gspo.config import ConfigError, GSPOConfig


def _quiet_deepspeed_probe() -> None:
    """accelerate imports DeepSpeed, when it is installed, inside every unwrap_model / save_pretrained, even
    when no DeepSpeed launch asked for it; on a machine without a GPU its accelerator probe then prints
    "Setting accelerator to CPU" on every run. Naming the CPU accelerator skips the probe (a user's own
    DS_ACCELERATOR wins)."""
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


_quiet_deepspeed_probe()

__version__ = "0.1.0"

__all__ = ["GSPOConfig", "ConfigError", "GSPOTrainer", "GSPODataset", "__version__"]


def __getattr__(name):  # keep `import gspo` light: the trainer pulls in transformers
    if name == "GSPOTrainer":
        from gspo.trainer import GSPOTrainer

        return GSPOTrainer
    if name == "GSPODataset":
        from gspo.data import GSPODataset

        return GSPODataset
    raise AttributeError(name)
