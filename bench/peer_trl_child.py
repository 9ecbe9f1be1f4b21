"""TRL's ``GRPOTrainer`` on dispo-ray's workload; run by ``bench_peer_trl`` in TRL's own venv.

    <trl-venv>/bin/python bench/peer_trl_child.py SPEC.json OUT.json

SPEC holds the model folder, the train/val parquet files, the launch time (unix seconds, taken by
the parent just before it started this process) and the matched settings. One RL step here is what
it is in dispo-ray: ``prompts_per_step x group_size`` completions generated once, then
``mini_batches`` optimizer steps over them in micro-batches of ``micro_batch_size``. In TRL's terms
(``trl/trainer/grpo_config.py``, 1.16.0): ``per_device_train_batch_size = micro_batch_size``,
``gradient_accumulation_steps = P*G / (mini_batches * micro_batch_size)``, ``steps_per_generation =
mini_batches * gradient_accumulation_steps`` (so ``generation_batch_size = P*G``), ``num_iterations
= 1``, and ``max_steps = mini_batches x RL steps`` (TRL counts optimizer steps).

Rewards are dispo-ray's own scoring pipeline called in this process (no sandbox: TRL's reward
functions are plain callables, which is cheaper than dispo-ray's sandboxed pool). Held-out accuracy
is avg@k over the same validation problems, sampled with ``model.generate`` at the training
temperature and scored the same way; evaluation time is measured and left out of step times.
"""
from __future__ import annotations

import json
import sys
import time


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from dispo_ray.infra.config import compose
    from dispo_ray.data.records import load_records
    from dispo_ray.reward.scoring import score_in_process

    cfg = compose(spec.get("overrides", []))
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    train_records, _ = load_records(spec["train_files"], tok, cfg.data)
    val_records, _ = load_records(spec["val_files"], tok, cfg.data)
    val_records = val_records[:spec["eval_prompts"]]
    max_new = spec["max_new_tokens"]

    def score(text: str, gt: str) -> float:
        return score_in_process(text, gt, cfg.reward, max_new).reward

    def correct(text: str, gt: str) -> bool:
        return score_in_process(text, gt, cfg.reward, max_new).correct

    def reward(prompts, completions, ground_truth, **_):
        return [score(c, gt) for c, gt in zip(completions, ground_truth)]

    P, G, M, mb = spec["prompts_per_step"], spec["group_size"], spec["mini_batches"], spec["micro_batch_size"]
    accum = P * G // (M * mb)
    assert accum * M * mb == P * G, "prompts_per_step x group_size must split into mini-batches of micro-batches"
    args = GRPOConfig(
        output_dir=spec["output_dir"], use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=mb, gradient_accumulation_steps=accum, steps_per_generation=M * accum,
        num_generations=G, num_iterations=1, max_completion_length=max_new, max_steps=M * spec["steps"],
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0,
        loss_type="dapo", epsilon=spec["clip_low"], epsilon_high=spec["clip_high"], beta=0.0,
        scale_rewards="group", temperature=1.0, top_p=1.0, top_k=0, mask_truncated_completions=False,
        generation_kwargs=spec.get("generation_kwargs") or None,
        seed=spec["seed"], logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, log_completions=False)
    train = Dataset.from_list([{"prompt": r.prompt, "ground_truth": r.ground_truth} for r in train_records])

    def evaluate(model) -> float:
        """avg@k over the validation problems, sampled like training (temperature 1)."""
        k, hits = spec["eval_k"], 0
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for s in range(0, len(val_records), 50):
                chunk = val_records[s:s + 50]
                enc = tok([r.prompt for r in chunk], return_tensors="pt", padding=True, padding_side="left")
                out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                     max_new_tokens=max_new, num_return_sequences=k,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                     **(spec.get("generation_kwargs") or {}))
                texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                hits += sum(correct(t, chunk[i // k].ground_truth) for i, t in enumerate(texts))
        if was_training:
            model.train()
        return hits / (k * len(val_records))

    class Clock(TrainerCallback):
        """Wall time per RL step (``mini_batches`` optimizer steps), evaluation left out."""

        def __init__(self):
            self.step_s, self.acc, self.eval_s, self.eval0_s, self.first_step_at = [], {}, 0.0, 0.0, None
            self._mark = None

        def _eval(self, model, rl_step):
            t0 = time.perf_counter()
            self.acc[rl_step] = evaluate(model)
            took = time.perf_counter() - t0
            self.eval_s += took
            return took

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.eval0_s = self._eval(model, 0)
            self._mark = time.perf_counter()
            self.first_step_at = time.time()

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % M:
                return
            now = time.perf_counter()
            self.step_s.append(now - self._mark)
            rl_step = state.global_step // M
            every = spec["eval_every"]
            took = self._eval(model, rl_step) if (every and rl_step % every == 0) or rl_step == spec["steps"] else 0.0
            self._mark = now + took

    if spec.get("torch_threads"):
        torch.set_num_threads(int(spec["torch_threads"]))
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    clock = Clock()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=train,
                          processing_class=tok, callbacks=[clock])
    trainer.train()
    result = {"step_s": clock.step_s, "accuracy": {str(k): v for k, v in clock.acc.items()},
              "startup_s": clock.first_step_at - spec["launch_time"] - clock.eval0_s, "eval_s": clock.eval_s,
              "torch_threads": torch.get_num_threads()}
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
