"""The seed's import surface: `from gspo_train import GSPOConfig, GSPOTrainer, GSPODataset`.

Also re-exports AutoTokenizer, which the seed's §8.1 example uses without importing it.
"""

from transformers import AutoTokenizer  # noqa: F401  (the seed's example relies on it)

from gspo.config import GSPOConfig
from gspo.data import GSPODataset
from gspo.trainer import GSPOTrainer

__all__ = ["GSPOConfig", "GSPOTrainer", "GSPODataset", "AutoTokenizer"]
