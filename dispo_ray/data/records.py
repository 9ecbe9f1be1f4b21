"""Loading verl-style math data and serving prompts with a deterministic, resumable cursor.

Rows (parquet via pyarrow; also ``.json`` / ``.jsonl``) carry

* a prompt under ``data.prompt_key``: plain text or a list of chat messages ``{role, content}``.
  With a tokenizer that has a chat template, messages (text becomes one user message) are
  rendered with it and a generation prompt; without one (the tiny tokenizer) the message contents
  are joined with newlines and used as plain text;
* a ground-truth answer under the dotted ``data.answer_key`` (``reward_model.ground_truth``), or a
  flat ``ground_truth`` / ``answer`` column;
* a data-source tag under ``data.data_source_key`` (else the file's name).

A row without a prompt or a ground truth raises :class:`DataError` naming file, row and key, or,
with ``data.skip_bad_rows``, is skipped and counted. Prompts longer than
``data.max_prompt_length`` tokens are always skipped and counted (as verl's overlong filter).

:class:`PromptDataset` walks the records epoch by epoch in an order fixed by ``(seed, epoch)``;
its cursor (epoch, position) is the whole state, so a resumed run continues exactly where it was.
"""
from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from dispo_ray.infra.validation import ConfigError

log = logging.getLogger(__name__)

FLAT_ANSWER_KEYS = ("ground_truth", "answer")


class DataError(ConfigError):
    """A bad data file or row; the message names the file, the row and the key."""


@dataclass
class PromptRecord:
    uid: str  # "<file stem>/<row>": stable across runs
    prompt: str  # the text the model is conditioned on (chat template applied when there is one)
    prompt_token_ids: List[int]
    ground_truth: str
    data_source: str


def read_rows(path: str) -> List[Dict[str, Any]]:
    """All rows of a parquet / json (list of objects) / jsonl file as Python dicts."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".parquet":
            import pyarrow.parquet as pq
            return pq.read_table(path).to_pylist()
        with open(path, encoding="utf-8") as f:
            if ext == ".jsonl":
                return [json.loads(line) for line in f if line.strip()]
            if ext == ".json":
                data = json.load(f)
                if isinstance(data, dict):  # {"data": [...]} or column-oriented {"col": [...]}
                    data = data.get("data", data)
                if isinstance(data, dict):
                    cols = list(data)
                    data = [dict(zip(cols, vals)) for vals in zip(*(data[c] for c in cols))]
                return list(data)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path}: cannot read as {ext.lstrip('.')}: {first}") from None
    raise DataError(f"{path}: unsupported extension {ext!r} (use .parquet, .json or .jsonl)")


def get_dotted(row: Dict[str, Any], key: str) -> Any:
    """``row["a"]["b"]`` for ``key = "a.b"``; None where any level is missing."""
    cur: Any = row
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _answer(row: Dict[str, Any], answer_key: str) -> Optional[str]:
    value = get_dotted(row, answer_key)
    for k in FLAT_ANSWER_KEYS:
        if value is None:
            value = row.get(k)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return value if isinstance(value, str) else str(value)


def _messages(prompt: Any) -> Optional[List[Dict[str, str]]]:
    """Normalise a prompt cell to chat messages; None when it is empty or malformed."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}] if prompt.strip() else None
    if isinstance(prompt, (list, tuple)) and prompt:
        msgs = []
        for m in prompt:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                return None
            msgs.append({"role": str(m.get("role") or "user"), "content": m["content"]})
        return msgs if any(m["content"].strip() for m in msgs) else None
    return None


def render_prompt(tokenizer: Any, messages: List[Dict[str, str]]) -> Tuple[str, List[int]]:
    """Prompt text and token ids: the chat template when the tokenizer has one, else plain text
    (message contents joined by newlines, the tokenizer's own special tokens added)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "\n".join(m["content"] for m in messages)
    return text, list(tokenizer(text, add_special_tokens=True)["input_ids"])


def row_problem(row: Any, data_cfg: Any) -> Optional[str]:
    """What is wrong with one row (missing or empty prompt, missing ground truth), or None."""
    if not isinstance(row, dict) or _messages(row.get(data_cfg.prompt_key)) is None:
        return f"missing or empty prompt (key '{data_cfg.prompt_key}')"
    if _answer(row, data_cfg.answer_key) is None:
        return (f"missing ground truth (key '{data_cfg.answer_key}', "
                f"or a flat {' / '.join(FLAT_ANSWER_KEYS)} column)")
    return None


def check_rows(path: str, rows: Sequence[Any], data_cfg: Any) -> int:
    """Raise :class:`DataError` naming the file and the first bad row (or, when no row has the
    column at all, the missing column and the columns there are); with ``data.skip_bad_rows``
    return the number of bad rows instead. No tokenizer needed: this runs before anything starts."""
    if not rows:
        raise DataError(f"{path}: the file has no rows")
    first = rows[0] if isinstance(rows[0], dict) else {}
    cols = ", ".join(sorted(first)) or "none"
    if not any(isinstance(r, dict) and data_cfg.prompt_key in r for r in rows):
        raise DataError(f"{path}: no prompt column '{data_cfg.prompt_key}' (data.prompt_key); columns: {cols}")
    if not any(isinstance(r, dict) and _answer(r, data_cfg.answer_key) is not None for r in rows):
        raise DataError(f"{path}: no ground-truth column '{data_cfg.answer_key}' (data.answer_key) nor a flat "
                        f"{' / '.join(FLAT_ANSWER_KEYS)} column; columns: {cols}")
    bad = 0
    for i, row in enumerate(rows):
        problem = row_problem(row, data_cfg)
        if problem:
            if not data_cfg.skip_bad_rows:
                raise DataError(f"{path}: row {i}: {problem} (set data.skip_bad_rows=true to skip such rows)")
            bad += 1
    if bad == len(rows):
        raise DataError(f"{path}: all {bad} rows are bad (missing prompt or ground truth)")
    return bad


def load_records(files: Sequence[str], tokenizer: Any, data_cfg: Any) -> Tuple[List[PromptRecord], Dict[str, int]]:
    """Read and tokenize every row of ``files``. Returns the records and counts
    ``{rows, kept, bad, too_long}``; bad rows raise unless ``data_cfg.skip_bad_rows``."""
    records: List[PromptRecord] = []
    stats = {"rows": 0, "kept": 0, "bad": 0, "too_long": 0}
    for path in files:
        stem = os.path.splitext(os.path.basename(path))[0]
        rows = read_rows(path)
        stats["bad"] += check_rows(path, rows, data_cfg)
        for i, row in enumerate(rows):
            stats["rows"] += 1
            if row_problem(row, data_cfg):
                continue  # counted by check_rows (which raised unless skip_bad_rows)
            text, ids = render_prompt(tokenizer, _messages(row[data_cfg.prompt_key]))
            if len(ids) > data_cfg.max_prompt_length:
                stats["too_long"] += 1
                continue
            source = get_dotted(row, data_cfg.data_source_key)
            records.append(PromptRecord(uid=f"{stem}/{i}", prompt=text, prompt_token_ids=ids,
                                        ground_truth=_answer(row, data_cfg.answer_key),
                                        data_source=str(source) if source else stem))
    stats["kept"] = len(records)
    if stats["bad"] or stats["too_long"]:
        log.warning("data %s: kept %d of %d rows (%d bad rows skipped, %d prompts over "
                    "data.max_prompt_length=%d tokens skipped)", list(files), stats["kept"],
                    stats["rows"], stats["bad"], stats["too_long"], data_cfg.max_prompt_length)
    if not records:
        raise DataError(f"{list(files)}: no usable rows ({stats}); all prompts longer than "
                        f"data.max_prompt_length={data_cfg.max_prompt_length} tokens?" if stats["too_long"]
                        else f"{list(files)}: no usable rows ({stats})")
    return records, stats


class PromptDataset:
    """Records served in seeded-shuffled epochs from a resumable ``(epoch, position)`` cursor."""

    def __init__(self, records: Sequence[PromptRecord], seed: int = 0, shuffle: bool = True,
                 stats: Optional[Dict[str, int]] = None):
        if not records:
            raise DataError("PromptDataset: no records")
        self.records = list(records)
        self.seed, self.shuffle = seed, shuffle
        self.stats = dict(stats or {})
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)
        self._requeued: List[PromptRecord] = []  # drawn, never trained: served again first
        self._by_uid = {r.uid: r for r in self.records}

    @classmethod
    def from_files(cls, files: Sequence[str], tokenizer: Any, data_cfg: Any, seed: int = 0,
                   shuffle: Optional[bool] = None) -> "PromptDataset":
        records, stats = load_records(files, tokenizer, data_cfg)
        return cls(records, seed=seed, shuffle=data_cfg.shuffle if shuffle is None else shuffle, stats=stats)

    def __len__(self) -> int:
        return len(self.records)

    def _epoch_order(self, epoch: int) -> List[int]:
        order = list(range(len(self.records)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> List[PromptRecord]:
        """The next ``n`` records, crossing into the next epoch (reshuffled) when one runs out."""
        out: List[PromptRecord] = self._requeued[:n]
        self._requeued = self._requeued[n:]
        while len(out) < n:
            if self.position == len(self.records):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            take = min(n - len(out), len(self.records) - self.position)
            out.extend(self.records[j] for j in self._order[self.position:self.position + take])
            self.position += take
        return out

    def __iter__(self) -> Iterable[PromptRecord]:
        """One pass over all records in file order (for evaluation); the cursor is untouched."""
        return iter(self.records)

    def requeue(self, records: Sequence[PromptRecord]) -> None:
        """Serve ``records`` (drawn but never trained, e.g. in flight at a checkpoint) before the
        cursor's next ones."""
        self._requeued = list(records) + self._requeued

    def state_dict(self, requeue: Sequence[PromptRecord] = ()) -> Dict[str, Any]:
        """The cursor; ``requeue``: records to serve first after a restore, before those already queued."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "shuffle": int(self.shuffle), "num_records": len(self.records),
                "requeued": [r.uid for r in list(requeue) + self._requeued]}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if int(state["num_records"]) != len(self.records):
            raise DataError(f"data cursor: saved for {state['num_records']} records, dataset has "
                            f"{len(self.records)} (the data files changed since the checkpoint)")
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self.epoch)
        missing = [u for u in state.get("requeued", []) if u not in self._by_uid]
        if missing:
            raise DataError(f"data cursor: re-queued prompt {missing[0]} is not in the dataset "
                            "(the data files changed since the checkpoint)")
        self._requeued = [self._by_uid[u] for u in state.get("requeued", [])]


def data_files(cfg: Any) -> Tuple[List[str], List[str]]:
    """``(train_files, val_files)`` from ``cfg.data``; the tiny task's parquet when train_files is empty."""
    train, val = list(cfg.data.train_files), list(cfg.data.val_files)
    if not train:
        from dispo_ray.tiny.task import tiny_task_files
        t, v = tiny_task_files(cfg)
        train, val = [t], (val or [v])
    return train, val
