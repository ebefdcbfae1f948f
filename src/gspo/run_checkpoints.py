"""A training run's checkpoints across ranks, on top of the atomic files of gspo.checkpoint.

Saving is collective: every rank adds its part (the back-end's full states, engine files only it holds,
its own RNG state), then the main rank writes checkpoint-<step>/ atomically. Resuming restores the
weights and optimizer through the back-end's TrainedModel, then the scheduler, RNG and trainer state.
The final export gathers sharded weights and, for LoRA with merge_lora_on_save, merges on a whole replica.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import broadcast_object_list, gather_object

from gspo import checkpoint as ckpt
from gspo.faults import TrainingInterrupted
from gspo.run_dir import apply_learning_rate, config_changes, refuse_changes

log = logging.getLogger("gspo")


CRITIC_DIR = "critic"  # the critic's part of a checkpoint, and of the final export


class RunCheckpoints:
    def __init__(self, *, accelerator, config, backend, policy, tokenizer, critic=None) -> None:
        self.acc, self.config, self.backend, self.policy, self.tokenizer = (
            accelerator,
            config,
            backend,
            policy,
            tokenizer,
        )
        self.critic = critic  # a second TrainedModel (advantage_estimator='gae'), saved and restored with the policy

    def path(self, step: int) -> Path:
        return Path(self.config.output_dir) / f"{ckpt.CHECKPOINT_PREFIX}{step}"

    def exists(self, step: int) -> bool:
        """A complete checkpoint of `step`, as the main rank sees it; every rank gets the same answer."""
        acc = self.acc
        found = float(acc.is_main_process and (self.path(step) / ckpt.COMPLETE_MARKER).is_file())
        return bool(acc.reduce(torch.tensor(found, device=acc.device), "max").item())

    def save(self, step: int, trainer_state: dict) -> Path:
        """Collective: call on every rank."""
        acc, cfg = self.acc, self.config
        acc.wait_for_everyone()
        rng = self._rng_per_rank()
        model_state, optim_state = self.policy.full_states(with_optimizer=True)
        holder = [ckpt.open_staging(cfg.output_dir, step) if acc.is_main_process else None]
        if acc.num_processes > 1:
            broadcast_object_list(holder)
        self.policy.save_native_state(holder[0])  # engine files every rank writes a part of (DeepSpeed)
        if self.critic is not None:
            self._save_critic(holder[0] / CRITIC_DIR, step)
        acc.wait_for_everyone()  # every rank's engine files are in before the checkpoint is completed
        if acc.is_main_process:
            ckpt.save_checkpoint(
                cfg.output_dir,
                step,
                self.policy.unwrapped(),
                tokenizer=self.tokenizer,
                scheduler=self.policy.scheduler,
                trainer_state={**trainer_state, "rng_per_rank": rng},
                save_total_limit=cfg.save_total_limit,
                model_state=model_state,
                optimizer_state=optim_state,
                staged=holder[0],
                config=cfg.to_dict(),
            )
        acc.wait_for_everyone()
        return self.path(step)

    def _save_critic(self, directory: Path, step: int) -> None:
        """The critic's part of a checkpoint being staged (collective): engine files, then weights, optimizer
        (where the back-end holds it whole) and scheduler."""
        model_state, optim_state = self.critic.full_states(with_optimizer=True)
        self.critic.save_native_state(directory)  # DeepSpeed's engine files, every rank its partition
        if self.acc.is_main_process:
            ckpt.write_model_part(
                directory,
                step,
                self.critic.unwrapped(),
                scheduler=self.critic.scheduler,
                model_state=model_state,
                optimizer_state=optim_state,
            )

    def save_if_due(self, step: int, total: int, signum: Optional[int], trainer_state) -> None:
        """Every save_steps steps and at the last step (so a finished run can be continued), or on a signal
        caught on any rank: then save and raise TrainingInterrupted. `trainer_state()` is called only to save."""
        acc, cfg = self.acc, self.config
        flag = acc.reduce(torch.tensor(float(signum or 0), device=acc.device), "max").item()
        if (cfg.save_steps and (step % cfg.save_steps == 0 or step == total)) or flag:
            path = self.save(step, trainer_state())
        if flag:
            message = (
                f"[gspo] interrupted at step {step}/{total}; checkpoint saved to {path}. Resume with "
                f"resume_from_checkpoint='latest' (CLI: --resume_from_checkpoint latest) and the same output_dir."
            )
            if acc.is_main_process:
                print(message, file=sys.stderr, flush=True)  # SystemExit with an int code prints nothing
            raise TrainingInterrupted(message, int(flag))

    def resume(self) -> Optional[dict]:
        """The trainer state of config.resume_from_checkpoint after restoring everything else; None without one."""
        cfg = self.config
        if not cfg.resume_from_checkpoint:
            return None
        path = ckpt.resolve_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint)  # verified: sizes, checksums
        manifest = ckpt.read_manifest(path) or {}
        refused, applied = config_changes(manifest.get("config"), cfg.to_dict())
        if refused and not cfg.allow_config_change:
            refuse_changes(refused, path)
        if refused and self.acc.is_main_process:
            log.warning("gspo: resuming %s with changes (allow_config_change): %s", path, "; ".join(refused))
        self.policy.load_checkpoint(path)  # weights and optimizer, as the back-end stores them
        state = ckpt.load_checkpoint(path, scheduler=self.policy.scheduler)  # + scheduler, RNG, trainer state
        if "learning_rate" in applied:  # never silently dropped: the restored optimizer would bring the old rate back
            old, new = applied["learning_rate"]
            apply_learning_rate(self.policy.optimizer, self.policy.scheduler, old, new)
            if self.acc.is_main_process:
                log.warning("gspo: learning_rate %g -> %g applied to the restored optimizer and schedule", old, new)
        if self.critic is not None:
            if not (path / CRITIC_DIR / ckpt.COMPLETE_MARKER).is_file():
                raise ValueError(f"{path} holds no critic ({CRITIC_DIR}/): it was not written by a run with a critic")
            self.critic.load_checkpoint(path / CRITIC_DIR)
            ckpt.load_checkpoint(path / CRITIC_DIR, scheduler=self.critic.scheduler, restore_rng=False)
        if state.get("rng_per_rank"):
            self._restore_rank_rng(state["rng_per_rank"])
        if self.acc.is_main_process:
            log.warning("gspo: resumed from %s at step %d", path, int(state["step"]))
        return state

    def export(self, output_dir) -> None:
        """The final model (full weights, or the LoRA adapter / merged weights) and tokenizer. Collective."""
        acc, cfg = self.acc, self.config
        acc.wait_for_everyone()
        model_state, _ = self.policy.full_states(with_optimizer=False)
        if acc.is_main_process:
            model = self.policy.unwrapped()
            if model_state is not None and cfg.use_lora and cfg.merge_lora_on_save:
                from gspo.models import apply_lora, load_causal_lm

                # peft merges in place on whole tensors: do it on an unsharded replica holding the gathered state
                with self.backend.whole_models():  # main process only: no ZeRO-3 partitioning here
                    model = apply_lora(load_causal_lm(cfg.policy_model_name, cfg), cfg)
                model.load_state_dict(model_state)
                model_state = None
            ckpt.save_final_model(
                model, self.tokenizer, output_dir, merge_lora=cfg.merge_lora_on_save, state_dict=model_state
            )
        self._export_critic(Path(output_dir) / CRITIC_DIR)
        acc.wait_for_everyone()

    def _export_critic(self, directory: Path) -> None:
        """output_dir/critic/: the critic, loadable with AutoModelForTokenClassification.from_pretrained."""
        if self.critic is None:
            return
        state, _ = self.critic.full_states(with_optimizer=False)
        if self.acc.is_main_process:
            ckpt.save_final_model(self.critic.unwrapped(), self.tokenizer, directory, state_dict=state)

    def _rng_per_rank(self) -> list:
        """Every rank's torch RNG (sampling draws from it); the checkpoint's rng_state.pt is the main rank's only."""
        state = {"torch": torch.get_rng_state().tolist()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state().tolist()
        return gather_object([state]) if self.acc.num_processes > 1 else [state]

    def _restore_rank_rng(self, states: list) -> None:
        acc = self.acc
        if len(states) != acc.num_processes:
            log.warning(
                "gspo: checkpoint has RNG states for %d processes, this run has %d: ranks keep the main "
                "process's RNG, so sampling will not continue exactly",
                len(states),
                acc.num_processes,
            )
            return
        mine = states[acc.process_index]
        torch.set_rng_state(torch.tensor(mine["torch"], dtype=torch.uint8))
        if "cuda" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state(torch.tensor(mine["cuda"], dtype=torch.uint8))
