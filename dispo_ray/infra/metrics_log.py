"""Where metrics go: ``metrics.jsonl`` (one object per step, with ``time``: unix seconds when it was
logged), TensorBoard event files beside it, W&B when ``trainer.wandb_project`` is set and wandb
is installed, and the console: a progress bar on a terminal; in a log file or a Ray job's log
(not a TTY) a plain line every ``LINE_EVERY_S`` seconds and at the last step instead, since a
carriage-return bar there becomes one ever-growing line."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Mapping, Optional

from dispo_ray.algorithm import metric_keys as K

CONSOLE_KEYS = (("reward", K.ROLLOUT_REWARD), ("acc", K.ROLLOUT_ACCURACY), ("eval", K.EVAL_ACCURACY),
                ("ent", K.ACTOR_ENTROPY), ("kept", K.ROLLOUT_GROUPS_KEPT), ("train tok/s", K.PERF_TOKENS_PER_S),
                ("gen tok/s", K.PERF_GENERATED_TOKENS_PER_S))
LINE_EVERY_S = 30.0


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf
    return v


class MetricsLogger:
    def __init__(self, run_dir: str, total_steps: int, tensorboard: bool = True,
                 wandb_project: Optional[str] = None, progress_bar: bool = True,
                 config: Optional[Mapping] = None, start_step: int = 0):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"))
        self._wandb = None
        if wandb_project:
            try:
                import wandb
                self._wandb = wandb.init(project=wandb_project, config=dict(config or {}), dir=run_dir)
            except ImportError:
                print("warning: trainer.wandb_project is set but wandb is not installed; skipping W&B",
                      file=sys.stderr)
        self._bar = None
        self.total_steps, self._t0, self._last_line = total_steps, time.time(), -math.inf
        self.tty = progress_bar and sys.stdout.isatty()
        self.plain_lines = progress_bar and not self.tty
        if self.tty:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                             file=sys.stdout)

    def log(self, step: int, metrics: Mapping[str, Any], advance: bool = True) -> None:
        now = time.time()
        record = {"step": step, "time": round(now, 3), **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                if self._tb is not None:
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(dict(record), step=step)
        if self._bar is not None and advance:
            shown = {name: f"{metrics[k]:.3g}" for name, k in CONSOLE_KEYS
                     if isinstance(metrics.get(k), (int, float)) and math.isfinite(metrics[k])}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1)
        elif self.plain_lines and advance and (now - self._last_line >= LINE_EVERY_S or step >= self.total_steps):
            self._last_line = now
            print(self.console_line(step, metrics, now - self._t0), flush=True)

    def console_line(self, step: int, metrics: Mapping[str, Any], elapsed_s: float) -> str:
        """``step 40/250 | 95s | reward 0.41 | acc 0.41 | ...``: what the bar's postfix shows."""
        shown = [f"{name} {metrics[k]:.3g}" for name, k in CONSOLE_KEYS
                 if isinstance(metrics.get(k), (int, float)) and math.isfinite(metrics[k])]
        return " | ".join([f"step {step}/{self.total_steps}", f"{elapsed_s:.0f}s", *shown])

    def rewind(self, step: int) -> None:
        """The run went back to ``step`` (a collapse-guard rollback): the bar shows it."""
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._file.close()


def read_metrics(run_dir: str) -> List[Dict[str, Any]]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
