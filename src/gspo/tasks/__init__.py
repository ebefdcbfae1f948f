"""Built-in offline tasks: integer arithmetic and a tiny locally built model."""

from gspo.tasks.arithmetic import exact_answer_reward, extract_answer, make_problems
from gspo.tasks.tiny_model import ensure_tiny_model, evaluate_accuracy, load_tiny_model

__all__ = [
    "make_problems",
    "exact_answer_reward",
    "extract_answer",
    "ensure_tiny_model",
    "evaluate_accuracy",
    "load_tiny_model",
]
