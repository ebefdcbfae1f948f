"""What the demo's gain is made of: greedy answers on the demo's 256 held-out problems, split into correct,
the warm-start teacher's mistake (true result + 1) and any other error, for each model directory given.

    .venv/bin/python bench/demo_errors.py ~/.cache/gspo/tiny-arithmetic-v5 outputs/demo

(the warm-started model before GSPO, and the model `make demo` saved after it). The problems are the ones
`gspo demo` evaluates: builtin:arithmetic-eval with the demo's seed (42), first 256.
"""

from __future__ import annotations

import sys


def breakdown(model_dir: str, problems: list[dict]) -> dict:
    from gspo.tasks.arithmetic import extract_answer
    from gspo.tasks.tiny_model import generate_completions, load_tiny_model

    model, tokenizer = load_tiny_model(model_dir)
    outputs = generate_completions(model, tokenizer, [p["prompt"] for p in problems], max_new_tokens=6, do_sample=False)
    answers = [extract_answer(o) for o in outputs]
    n = len(problems)
    correct = sum(a == p["answer"] for a, p in zip(answers, problems)) / n
    teacher = sum(a == str(int(p["answer"]) + 1) for a, p in zip(answers, problems)) / n
    return {"correct": correct, "teacher_plus_one": teacher, "other": 1.0 - correct - teacher}


def main(argv: list[str]) -> int:
    import torch

    from gspo.tasks.arithmetic import make_problems

    torch.set_num_threads(1)
    problems = make_problems(256, seed=42, split="eval")
    for model_dir in argv:
        b = breakdown(model_dir, problems)
        print(
            f"{model_dir}: correct {b['correct']:.3f}, the teacher's +1 mistake {b['teacher_plus_one']:.3f}, "
            f"other errors {b['other']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
