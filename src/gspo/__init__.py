"""gspo: Group Sequence Policy Optimization for Hugging Face causal language models."""
from gspo.config import ConfigError, GSPOConfig

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
