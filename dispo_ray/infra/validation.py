"""The config's rules across sections, checked before any actor starts (:func:`validate`).

A key's own range or choices sits beside its field in :mod:`dispo_ray.infra.config` and a rule
among one section's keys in that section's ``check`` (both run generically by
:func:`dispo_ray.infra.rules.check_section`); what stays here ties sections together. Each
failure is one :class:`ConfigError` line naming the key, the value and what is allowed.
"""
from __future__ import annotations

from typing import Any

from dispo_ray.infra.rules import ConfigError, check, check_section

__all__ = ["ConfigError", "validate"]


def validate(c: Any) -> None:
    """Check every value users can set; raise ConfigError naming the first bad key."""
    check_section(c)
    a, g, l, tr = c.algorithm, c.generator, c.learner, c.trainer

    ws, num_train = c.model.warmstart, c.data.tiny_task.num_train
    check(ws.dev_size < num_train, "model.warmstart.dev_size", ws.dev_size,
          f">= 1 and below data.tiny_task.num_train={num_train}")
    # NCCL refuses two ranks of one communicator on one GPU: the weight sync speaks NCCL whenever
    # both pools are on GPUs (dispo_ray.infra.devices.sync_backend)
    check(not (l.num_gpus_per_actor > 0 and g.num_gpus_per_actor > 0) or float(g.num_gpus_per_actor).is_integer(),
          "generator.num_gpus_per_actor", g.num_gpus_per_actor,
          "a whole number of GPUs when learner.num_gpus_per_actor > 0 (the weight sync then speaks NCCL, "
          "which refuses two ranks on one GPU)")
    r = c.reward
    check(r.overlong_buffer < g.max_new_tokens or r.overlong_buffer == 0, "reward.overlong_buffer",
          r.overlong_buffer, f"< generator.max_new_tokens={g.max_new_tokens}")

    longest = c.data.max_prompt_length + g.max_new_tokens
    check(l.max_tokens_per_micro_batch == 0 or l.max_tokens_per_micro_batch >= longest,
          "learner.max_tokens_per_micro_batch", l.max_tokens_per_micro_batch,
          f"0 (off) or >= data.max_prompt_length + generator.max_new_tokens = {longest} (the longest sequence)")
    samples = tr.prompts_per_step * a.group_size
    ranks_x_minis = l.num_actors * l.mini_batches
    check(samples % ranks_x_minis == 0, "trainer.prompts_per_step", tr.prompts_per_step,
          f"such that prompts_per_step * algorithm.group_size ({samples}) is divisible by "
          f"learner.num_actors * learner.mini_batches ({ranks_x_minis})")
    if tr.collapse_guard.action == "rollback":
        check(a.name == "dispo", "trainer.collapse_guard.action", tr.collapse_guard.action,
              f"warn or stop with algorithm.name={a.name} (rollback widens a DISPO window)")
        check(tr.save_every >= 1, "trainer.save_every", tr.save_every,
              ">= 1 with trainer.collapse_guard.action=rollback (it restores a saved checkpoint)")
