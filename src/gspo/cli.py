"""The `gspo` command: train, eval, demo, compare, plot, completions, config.

    gspo train  [--config run.yaml] [--<field> <value> ...]
    gspo eval   --model DIR --dataset PATH --reward_funcs SPEC[,SPEC] [--out metrics.json]
    gspo demo   [--task arithmetic|tools] [--output_dir DIR] [--max_steps N] [--rollout_engine hf|vllm]
    gspo compare [--config YAML | --task arithmetic|moe] [--algorithms gspo,grpo,...] [--seeds 0,1,2] [--max_steps N]
    gspo plot   RUN_DIR [--out PNG]
    gspo completions RUN_DIR [--step N] [--worst [K] | --best [K] | --sample K]   # read the completions record
    gspo config [--config run.yaml] [--<field> <value> ...]   # print the resolved config

Every GSPOConfig field is a flag named exactly after it (`--group_size 8`). Flags default
to "not given", so only the flags you type override the YAML file, which overrides the
dataclass defaults. Multi-process runs: `accelerate launch -m gspo train ...`.

User mistakes (a bad config value, unreadable data, a broken reward function) print
"gspo: error: <message>" and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from gspo.config import ConfigError, GSPOConfig
from gspo.yaml_config import config_fields, config_to_yaml, load_config, parse_cli_value, suggest, type_name

PROG = "gspo"
ERROR_EXIT = 2
FIELD_FLAG_COMMANDS = ("train", "eval", "config")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps description/epilog line breaks; never splits a word at a hyphen, so values
    such as 'seq-mean-token-mean' stay whole in the help text."""

    def _split_lines(self, text: str, width: int) -> list:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)


# ----------------------------------------------------------------------------------
# One flag per GSPOConfig field
# ----------------------------------------------------------------------------------
def default_text(f: dataclasses.Field) -> str:
    """The field's default as a user would type it."""
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def choices_text(f: dataclasses.Field) -> str:
    choices = f.metadata.get("choices")
    if not choices:
        return ""
    return ", ".join("none" if c is None else str(c) for c in choices)


def field_help_line(f: dataclasses.Field) -> str:
    """`help` + choices + default, as shown by `gspo train --help` and in the docs."""
    parts = [f.metadata.get("help", "")]
    if choices_text(f):
        parts.append(f"Choices: {choices_text(f)}.")
    parts.append(f"Default: {default_text(f)}.")
    return " ".join(parts)


def _converter(name: str) -> Callable[[str], Any]:
    """argparse `type=`: parse_cli_value, with its message turned into argparse's error."""

    def convert(text: str) -> Any:
        try:
            return parse_cli_value(name, text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = type_name(name)  # argparse names the type in some messages
    return convert


def add_field_flags(parser: argparse.ArgumentParser) -> None:
    """Add --<field> for every GSPOConfig field, defaulting to 'not given'."""
    group = parser.add_argument_group("GSPOConfig fields (override the YAML file)")
    for name, f in config_fields().items():
        metavar = type_name(name).split("[")[0].split(" ")[0].upper()
        group.add_argument(
            f"--{name}",
            dest=name,
            type=_converter(name),
            default=argparse.SUPPRESS,
            metavar=metavar,
            help=field_help_line(f).replace("%", "%%"),
        )


def field_overrides(args: argparse.Namespace) -> dict:
    """The config fields given explicitly on the command line."""
    return {k: v for k, v in vars(args).items() if k in config_fields()}


def _fields_epilog() -> str:
    """Every field with its help, for `gspo --help`."""
    lines = ["config fields (YAML keys, and --<field> flags of train / eval / config):"]
    for name, f in config_fields().items():
        lines.append(f"  {name} ({type_name(name)})")
        lines += textwrap.wrap(
            field_help_line(f),
            88,
            initial_indent="      ",
            subsequent_indent="      ",
            break_on_hyphens=False,
            break_long_words=False,
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------
# The parser
# ----------------------------------------------------------------------------------
def _wrap(text: str) -> str:
    return textwrap.fill(text, 88, break_on_hyphens=False)


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        dest="config_path",
        metavar="YAML",
        default=None,
        help="YAML file of GSPOConfig fields (see examples/); flags override it.",
    )


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        usage=f"{PROG} train [--config YAML] [--<field> VALUE ...]",
        help="Train with GSPO (reads dataset_path from the config).",
        description=_wrap(
            "Train a policy with GSPO on dataset_path. Precedence: GSPOConfig "
            "defaults < --config YAML < --<field> flags. Multi-process: "
            "accelerate launch -m gspo train ..."
        ),
        formatter_class=_HelpFormatter,
    )
    _add_config_option(p)
    add_field_flags(p)
    p.set_defaults(handler=cmd_train)


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        usage=f"{PROG} eval [--model DIR] [--dataset PATH] [--out JSON] [--max_samples N] "
        "[--config YAML] [--<field> VALUE ...]",
        help="Decode a model on a prompt set (greedy, or k samples per prompt) and score it with reward functions.",
        description=_wrap(
            "Evaluate a model: greedy decoding (or eval_num_samples k completions per prompt at eval_temperature: "
            "mean@k, pass@j), each reward's mean, eval/accuracy (the share of completions whose accuracy_reward, "
            "by default the first correctness reward, is >= accuracy_threshold). Prints the metrics as JSON; --out "
            "also writes them and the per-sample records (.completions.parquet). A run directory as --model, "
            "without --config, is evaluated with the run's own config. No reference model is loaded."
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="DIR",
        help="Model to evaluate (a directory, hub id or builtin:tiny-arithmetic); default: policy_model_name.",
    )
    p.add_argument(
        "--dataset",
        default=None,
        metavar="PATH",
        help="Prompts: a file, dataset directory or builtin:arithmetic-eval; default: eval_dataset_path.",
    )
    p.add_argument("--out", default=None, metavar="JSON", help="Also write the metrics to this JSON file.")
    p.add_argument(
        "--max_samples", type=int, default=None, metavar="N", help="Evaluate at most N prompts (sets eval_max_samples)."
    )
    _add_config_option(p)
    add_field_flags(p)
    p.set_defaults(handler=cmd_eval)


def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="Run GSPO, GRPO, PPO and VAPO side by side on one task; writes compare.png and compare.md.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--config",
        dest="config_path",
        default=None,
        metavar="YAML",
        help="Base config (data, reward, model, sampling); default: the offline demo's built-in arithmetic task.",
    )
    p.add_argument(
        "--task",
        choices=("arithmetic", "moe"),
        default="arithmetic",
        help="Without --config: arithmetic (the demo's task and model) or moe (the same on "
        "builtin:tiny-arithmetic-moe, 4 mini-batches per rollout, the paper's off-policy setting).",
    )
    p.add_argument(
        "--algorithms",
        default=None,
        help="Comma-separated presets: gspo, grpo, ppo, vapo, grpo-replay, gspo-replay (Routing Replay 'old'); "
        "default gspo,grpo,ppo,vapo, or for --task moe gspo,grpo,grpo-replay,gspo-replay.",
    )
    p.add_argument("--seeds", default="0", help="Comma-separated seeds, e.g. 0,1,2 (default: 0).")
    p.add_argument("--max_steps", type=int, default=None, metavar="N", help="Steps per run (default: the base's).")
    p.add_argument("--output_dir", default="outputs/compare", metavar="DIR", help="Default: outputs/compare.")
    p.set_defaults(handler=cmd_compare)


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="Offline demo: GSPO on the built-in arithmetic task with the tiny model.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--task",
        choices=("arithmetic", "tools"),
        default="arithmetic",
        help="arithmetic (default), or tools: multi-turn episodes where the model learns to call a calculator.",
    )
    p.add_argument(
        "--output_dir", default=None, metavar="DIR", help="Default: outputs/demo (outputs/demo-tools for --task tools)."
    )
    p.add_argument(
        "--max_steps", type=int, default=None, metavar="N", help="Training steps (default: the demo's tuned value)."
    )
    p.add_argument(
        "--rollout_engine",
        choices=("hf", "vllm"),
        default="hf",
        help="What generates rollouts: hf (default) or vllm (needs vllm; see README).",
    )
    p.set_defaults(handler=cmd_demo)


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="Plot a run's metrics.jsonl to a PNG.", formatter_class=_HelpFormatter)
    p.add_argument("run_dir", help="A run's output_dir (or its metrics.jsonl).")
    p.add_argument("--out", default=None, metavar="PNG", help="Default: <run_dir>/training_curves.png.")
    p.set_defaults(handler=cmd_plot)


def _add_completions(sub) -> None:
    p = sub.add_parser(
        "completions",
        help="Print completions from a run's record (completions/*.parquet) or an eval's records.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("run_dir", help="A run's output_dir, its completions/ directory, or one .parquet records file.")
    p.add_argument("--step", type=int, default=None, metavar="N", help="The step to read (default: the last one).")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--worst", type=int, nargs="?", const=5, default=None, metavar="K", help="The K lowest rewards.")
    which.add_argument("--best", type=int, nargs="?", const=5, default=None, metavar="K", help="The K highest rewards.")
    which.add_argument("--sample", type=int, default=None, metavar="K", help="K rows drawn at random (--seed).")
    p.add_argument("--first", type=int, default=5, metavar="K", help="Without --worst/--best/--sample: the first K.")
    p.add_argument("--seed", type=int, default=0, help="Seed of --sample.")
    p.add_argument("--max_chars", type=int, default=2000, metavar="N", help="Cut texts longer than this.")
    p.set_defaults(handler=cmd_completions)


def _add_config(sub) -> None:
    p = sub.add_parser(
        "config",
        usage=f"{PROG} config [--config YAML] [--<field> VALUE ...]",
        help="Print the resolved config as YAML (checks precedence and values).",
        formatter_class=_HelpFormatter,
    )
    _add_config_option(p)
    add_field_flags(p)
    p.set_defaults(handler=cmd_config)


def build_parser() -> argparse.ArgumentParser:
    from gspo import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0] + "\n\n" + textwrap.dedent(__doc__.split("\n\n")[1]),
        epilog=_fields_epilog(),
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_train, _add_eval, _add_demo, _add_compare, _add_plot, _add_completions, _add_config):
        add(sub)
    for p in sub.choices.values():
        p.allow_abbrev = False  # --group would otherwise silently mean --group_size
    return parser


# ----------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------
def _require_reward(cfg: GSPOConfig, command: str) -> None:
    """Fail before any model is loaded when the run could not score a completion."""
    if not cfg.reward_funcs and not cfg.reward_model_name and cfg.environment is None:
        raise ConfigError(
            f"gspo {command} needs a reward: pass --reward_funcs NAME[,NAME] "
            "(e.g. exact_answer, or path/to/file.py:function) or --reward_model_name"
        )


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config_path, field_overrides(args))
    if cfg.dataset_path is None:
        raise ConfigError("gspo train needs prompts: pass --dataset_path PATH (or set dataset_path in the YAML file)")
    _require_reward(cfg, "train")
    from gspo.trainer import GSPOTrainer

    trainer = GSPOTrainer(cfg)
    trainer.train()
    if trainer.accelerator.is_main_process:
        print(f"[gspo] trained {trainer.step} steps; final model and metrics in {cfg.output_dir}", flush=True)
    return 0


def eval_config(args: argparse.Namespace) -> GSPOConfig:
    """The config for `gspo eval`: the model to evaluate as policy_model_name. Without --config, a run directory's
    own gspo_config.json is the base (its rewards, system_prompt, chat template and lengths), so a trained model is
    evaluated as it was trained; the run's data and output paths are not used."""
    overrides = field_overrides(args)
    if args.model is not None:
        overrides["policy_model_name"] = args.model
    if args.max_samples is not None:
        overrides["eval_max_samples"] = args.max_samples
    base = args.config_path
    from gspo.tracking import CONFIG_FILE  # what a training run writes into its output_dir

    run_config = Path(args.model or "") / CONFIG_FILE
    if base is None and args.model is not None and run_config.is_file():
        base = str(run_config)
        overrides = {"dataset_path": None, "resume_from_checkpoint": None, **overrides}
        print(f"[gspo] evaluating with the run's config {run_config} (--config replaces it)", file=sys.stderr)
    return load_config(base, overrides)


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = eval_config(args)
    dataset = args.dataset or cfg.eval_dataset_path
    if dataset is None:
        raise ConfigError("gspo eval needs prompts: pass --dataset PATH (or set eval_dataset_path)")
    _require_reward(cfg, "eval")
    from accelerate import PartialState

    from gspo.model_eval import evaluate_model

    metrics, records = evaluate_model(cfg, dataset, records=True)
    if PartialState().is_main_process:
        text = json.dumps(metrics, indent=2, sort_keys=True)
        print(text, flush=True)
        if args.out:
            from gspo.completions import write_records

            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text + "\n")
            path = write_records(records, out.with_name(out.stem + ".completions.parquet"))
            print(f"[gspo] per-sample records: {path} (read them: gspo completions {path})", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gspo.demo import run_demo

    output_dir = args.output_dir or ("outputs/demo" if args.task == "arithmetic" else f"outputs/demo-{args.task}")
    run_demo(output_dir=output_dir, max_steps=args.max_steps, task=args.task, rollout_engine=args.rollout_engine)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from gspo.compare import run_compare

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r}: expected comma-separated integers such as 0,1,2") from None
    from gspo.compare import TASKS

    names = args.algorithms if args.algorithms is not None else ",".join(TASKS[args.task])
    algorithms = [a.strip() for a in names.split(",") if a.strip()]
    run_compare(
        algorithms=algorithms,
        seeds=seeds,
        output_dir=args.output_dir,
        config_path=args.config_path,
        max_steps=args.max_steps,
        task=args.task,
    )
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from gspo.plotting import plot_run

    if not Path(args.run_dir).exists():
        raise ConfigError(f"run directory {args.run_dir!r} does not exist")
    try:
        path = plot_run(args.run_dir, args.out)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    print(path)
    return 0


def cmd_completions(args: argparse.Namespace) -> int:
    from gspo.completions import format_row, pick_rows, read_records, record_files

    source = Path(args.run_dir)
    for name in ("worst", "best", "sample", "first"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name} {getattr(args, name)}: give a number of rows >= 1")
    if source.is_file():
        if args.step is not None:
            raise ConfigError(f"--step {args.step} with a records file ({source}): the file is one step's; drop --step")
        path = source
    else:
        try:
            files = record_files(source)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
        step = args.step if args.step is not None else max(files)
        if step not in files:
            raise ConfigError(f"{source}: no completions for step {step}; steps recorded: {_ranges(sorted(files))}")
        path = files[step]
    rows = read_records(path)
    order, k = next(
        ((o, v) for o, v in (("worst", args.worst), ("best", args.best), ("sample", args.sample)) if v is not None),
        ("first", args.first),
    )
    picked = pick_rows(rows, order=order, k=k, seed=args.seed)
    print(f"{path}: {len(rows)} completions, showing {len(picked)} ({order})\n")
    print("\n\n".join(format_row(r, args.max_chars) for r in picked))
    return 0


def _ranges(steps: list) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    out, start = [], None
    for i, s in enumerate(steps):
        start = s if start is None else start
        if i + 1 == len(steps) or steps[i + 1] != s + 1:
            out.append(f"{start}-{s}" if s != start else str(s))
            start = None
    return ", ".join(out)


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config_path, field_overrides(args))
    if cfg.reward_funcs:  # names, reward_kwargs and accuracy_reward, as train would check them (no model loads)
        from gspo.evaluate import accuracy_source
        from gspo.rewards import RewardError, RewardScorer

        try:
            accuracy_source(RewardScorer.from_config(cfg), cfg.accuracy_reward)
        except RewardError as e:
            raise ConfigError(str(e)) from None
    print(config_to_yaml(cfg), end="")
    return 0


# ----------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------
def user_errors() -> tuple:
    """Exceptions that mean 'the user's input is wrong': reported in one line, status 2."""
    errors: list = [ConfigError]
    try:
        from gspo.data import DataError

        errors.append(DataError)
    except ImportError:
        pass
    try:
        from gspo.rewards import RewardError

        errors.append(RewardError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the `gspo` command; returns the exit status (argparse exits 2 on a bad flag)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse's own message, with what the flag is called here (a TRL name, or a near spelling)
        flags = [u for u in unknown if u.startswith("--")]
        hint = suggest(flags[0][2:].split("=")[0]) if flags else ""
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    try:
        return args.handler(args)
    except user_errors() as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
