"""Short supervised warm start of the tiny model on the tiny task, cached on disk.

RL from a random initialisation never sees a reward on this task, so the embedded default first
teaches the format and a little arithmetic by teacher forcing on correct solutions: for a prompt
``x`` and solution ``y = "\\boxed{answer}</s>"`` it minimises the response-only cross-entropy

    L = - (1 / sum |y|) * sum_batch sum_t log p_theta(y_t | x, y_<t)

(prompt and padding positions carry no loss) with torch AdamW on ``batch_size`` problems at a time drawn from the *train* split, until the
greedy accuracy on a dev slice of the train split (its first ``dev_size`` problems, held out from
this phase) reaches ``target_accuracy`` -- checked every ``check_every`` steps -- or ``steps`` steps
have run (``target_accuracy: 0`` trains exactly ``steps``). A target, not a step count, because float
kernels steer a fixed step count to different accuracies on different CPUs (docs/benchmarks.md). The
result is clearly imperfect on purpose, so RL has room to show; its greedy accuracy on the
validation split is measured, logged and stored in ``warmstart.json`` next to the weights (the
validation split never steers the warm start).

The folder (HF model + tokenizer) is keyed by a hash of ``model.tiny``, ``data.tiny_task`` and
``model.warmstart``, written to a temporary folder and renamed, so later runs reuse it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from dispo_ray.tiny.model import build_tiny_model, tiny_config_hash
from dispo_ray.tiny.task import _task_hash, make_problems, prompt_text, response_text

log = logging.getLogger(__name__)
FORMAT_VERSION = 2  # 2: stops at a dev-slice target accuracy
SEED = 0
LONGTAIL_TOKEN_BUDGET = 4096  # padded tokens a micro-batch of a long-tail task (data.tiny_task.digits=longtail)


def warmstart_hash(cfg: Any) -> str:
    blob = json.dumps({"tiny": tiny_config_hash(cfg.model), "task": _task_hash(cfg.data.tiny_task),
                       "warm": asdict(cfg.model.warmstart), "format": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def warmstart_dir(cfg: Any) -> str:
    return os.path.join(os.path.expanduser(cfg.model.cache_dir), f"warm-{warmstart_hash(cfg)}")


def _pairs(tokenizer: Any, rows: Sequence[Dict[str, Any]], style: str = "answer") -> List[Tuple[List[int], List[int]]]:
    """(prompt ids with <s>, response ids ending in </s>) for each problem; the prompt is tokenized
    exactly as :func:`dispo_ray.data.records.render_prompt` does for a template-less tokenizer."""
    out = []
    for r in rows:
        e = r["extra_info"]
        p = tokenizer(prompt_text(e["a"], e["op"], e["b"]), add_special_tokens=True)["input_ids"]
        y = tokenizer(response_text(e["a"], e["op"], e["b"], style), add_special_tokens=False)["input_ids"]
        out.append((list(p), list(y) + [tokenizer.eos_token_id]))
    return out


def _batch(pairs: Sequence[Tuple[List[int], List[int]]], pad_id: int):
    """Right-padded ``input_ids`` and ``labels`` (-100 except on response tokens)."""
    import torch

    T = max(len(p) + len(y) for p, y in pairs)
    ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), T), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), T), dtype=torch.long)
    for b, (p, y) in enumerate(pairs):
        seq = p + y
        ids[b, :len(seq)] = torch.tensor(seq)
        labels[b, len(p):len(seq)] = torch.tensor(y)
        mask[b, :len(seq)] = 1
    return ids, mask, labels


def greedy_accuracy(model: Any, tokenizer: Any, rows: Sequence[Dict[str, Any]], style: str = "answer",
                    batch_size: int = 256, by_length: bool = False) -> float:
    """Fraction of problems whose greedy response is exactly the correct response (in ``style``:
    the boxed answer, or the working and the boxed answer). ``by_length`` (long-tail tasks) decodes
    the problems shortest first in chunks of 64, each only as far as its longest correct response."""
    import torch

    pairs = _pairs(tokenizer, rows, style)
    max_new_tokens = max(len(y) for _, y in pairs)
    if by_length:
        pairs, batch_size = sorted(pairs, key=lambda py: (len(py[1]), len(py[0]))), min(batch_size, 64)
    correct = 0
    model.eval()
    with torch.no_grad():
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s:s + batch_size]
            if by_length:
                max_new_tokens = max(len(y) for _, y in chunk)
            P = max(len(p) for p, _ in chunk)  # left-pad prompts so generation starts aligned
            ids = torch.full((len(chunk), P), tokenizer.pad_token_id, dtype=torch.long)
            att = torch.zeros((len(chunk), P), dtype=torch.long)
            for b, (p, _) in enumerate(chunk):
                ids[b, P - len(p):] = torch.tensor(p)
                att[b, P - len(p):] = 1
            out = model.generate(input_ids=ids, attention_mask=att, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            for b, (_, y) in enumerate(chunk):
                gen = out[b, P:].tolist()
                correct += int(gen[:len(y)] == y)
    return correct / max(1, len(pairs))


def micro_batches(pairs: Sequence[Tuple[List[int], List[int]]], token_budget: int) -> List[List[Tuple[List[int], List[int]]]]:
    """``pairs`` shortest first, cut into micro-batches of at most ``token_budget`` padded tokens
    (a sequence longer than the budget goes alone), so a long-tail batch pads only its long rows."""
    out: List[List[Tuple[List[int], List[int]]]] = [[]]
    for pr in sorted(pairs, key=lambda py: len(py[0]) + len(py[1])):
        if out[-1] and (len(pr[0]) + len(pr[1])) * (len(out[-1]) + 1) > token_budget:
            out.append([])
        out[-1].append(pr)
    return out


def train(model: Any, tokenizer: Any, rows: Sequence[Dict[str, Any]], steps: int, lr: float, batch_size: int,
          seed: int = SEED, check_every: int = 0, done: Optional[Callable[[], bool]] = None,
          style: str = "answer", token_budget: int = 0) -> List[float]:
    """Teacher-forced response-only cross-entropy with AdamW; returns the per-step losses. With
    ``done``, it is asked after every ``check_every`` steps and training stops when it says so.
    ``token_budget > 0`` (long-tail tasks) runs each batch as :func:`micro_batches` with the
    gradients accumulated: the same loss (summed over the batch's response tokens, divided by
    their count) without padding every row to the longest."""
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    pairs = _pairs(tokenizer, rows, style)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for _ in range(steps):
        chosen = rng.sample(pairs, min(batch_size, len(pairs)))
        if token_budget > 0:
            opt.zero_grad(set_to_none=True)
            n_tokens, loss = sum(len(y) for _, y in chosen), 0.0
            for mb in micro_batches(chosen, token_budget):
                ids, mask, labels = _batch(mb, tokenizer.pad_token_id)
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                part = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                         ignore_index=-100, reduction="sum") / n_tokens
                part.backward()
                loss += float(part.detach())
            loss = torch.tensor(loss)
        else:
            ids, mask, labels = _batch(chosen, tokenizer.pad_token_id)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                     ignore_index=-100)  # mean over response tokens
            opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if done is not None and check_every > 0 and len(losses) % check_every == 0:
            stop = done()
            model.train()  # done() evaluates in eval mode
            if stop:
                break
    model.eval()
    return losses


def warm_started_model_dir(cfg: Any) -> str:
    """An HF folder (weights + tokenizer) to generate and train from: ``model.path`` when set,
    else the warm-started tiny model (built and cached on first use)."""
    if cfg.model.path is not None:
        return cfg.model.path
    out = warmstart_dir(cfg)
    if os.path.isfile(os.path.join(out, "warmstart.json")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = build_tiny_model(cfg.model)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    splits = make_problems(cfg.data.tiny_task)
    w = cfg.model.warmstart
    dev, train_rows = splits["train"][:w.dev_size], splits["train"][w.dev_size:]
    style = cfg.data.tiny_task.style
    long_tail = getattr(cfg.data.tiny_task, "digits", "uniform") == "longtail"
    checks: List[Tuple[int, float]] = []  # (step, dev greedy accuracy)

    def reached() -> bool:
        checks.append((len(checks) * w.check_every + w.check_every,
                       greedy_accuracy(model, tok, dev, style, by_length=long_tail)))
        return checks[-1][1] >= w.target_accuracy

    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs faster on one thread than on shared cores
    try:
        losses = train(model, tok, train_rows, w.steps, w.lr, w.batch_size, check_every=w.check_every,
                       done=reached if w.target_accuracy > 0 else None, style=style,
                       token_budget=LONGTAIL_TOKEN_BUDGET if long_tail else 0)
        train_s = time.perf_counter() - t0
        acc = greedy_accuracy(model, tok, splits["val"], style, by_length=long_tail)
    finally:
        torch.set_num_threads(threads)
    info = {"steps": len(losses), "max_steps": w.steps, "target_accuracy": w.target_accuracy,
            "reached_target": bool(checks) and checks[-1][1] >= w.target_accuracy,
            "dev_greedy_accuracy": checks[-1][1] if checks else None, "dev_checks": checks,
            "lr": w.lr, "batch_size": w.batch_size, "train_seconds": round(train_s, 2),
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            "val_greedy_accuracy": acc, "num_val": len(splits["val"]), "num_dev": len(dev)}
    log.warning("warm start: %d steps in %.1fs, loss %.3f -> %.3f, greedy dev accuracy %s, val %.1f%%",
                len(losses), train_s, info["first_loss"] or 0, info["final_loss"] or 0,
                "n/a" if not checks else f"{100 * checks[-1][1]:.1f}%", 100 * acc)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".warm-build-", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):  # the very files the base model has
            shutil.copy(os.path.join(base, f), os.path.join(tmp, f))
        with open(os.path.join(tmp, "warmstart.json"), "w") as f:
            json.dump(info, f, indent=1)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first: keep theirs
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def warmstart_info(cfg: Any) -> Dict[str, Any]:
    """The metrics stored with the cached warm start (builds it if needed)."""
    with open(os.path.join(warm_started_model_dir(cfg), "warmstart.json")) as f:
        return json.load(f)
