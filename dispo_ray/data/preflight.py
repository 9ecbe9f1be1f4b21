"""Checks of what the user brings, run by ``dispo_ray.main`` after the config rules and before
Ray, the warm start or any actor starts (:func:`check_inputs`).

* every data file (``data.train_files``, ``val_files``, ``extra_eval_files``): readable, the prompt
  and ground-truth columns present, every row usable (``dispo_ray.data.records.check_rows``: file and row
  named; counted instead with ``data.skip_bad_rows``);
* the model folder (``model.path``): a ``config.json`` transformers can read, a tokenizer that
  loads and fits the embedding (``len(tokenizer) <= vocab_size``), an architecture the chosen
  generator backend implements, and for vLLM's CPU attention a head_dim it has kernels for;
* GPUs asked for on a node whose NVIDIA driver torch cannot use (:func:`check_gpu_node`).

Each failure is one :class:`InputError` line naming the file, row or key; main prints it, with no
traceback, and exits 2, as for config errors.
"""
from __future__ import annotations

import json
import os
from typing import Any, List

from dispo_ray.infra.validation import ConfigError


class InputError(ConfigError):
    """A user's data file or model folder cannot be used; one line naming file, row or key."""


def check_data_files(cfg: Any) -> None:
    from dispo_ray.data.records import DataError, check_rows, read_rows

    d = cfg.data
    for group in ("train_files", "val_files", "extra_eval_files"):
        for path in getattr(d, group):
            try:
                check_rows(path, read_rows(path), d)
            except DataError as e:
                raise InputError(f"data.{group}: {e}") from None


def _head_dim(config: Any) -> int:
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else int(config.hidden_size) // int(config.num_attention_heads)


def vllm_cpu_support() -> tuple:
    """(architectures vLLM implements, head sizes its CPU attention has kernels for), read from the
    installed vLLM itself (~5 s of imports, so only paid for a user's own model folder)."""
    from vllm.model_executor.models import ModelRegistry
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return set(ModelRegistry.get_supported_archs()), list(CPUAttentionBackend.get_supported_head_sizes())


def check_model_folder(cfg: Any) -> None:
    path, g = cfg.model.path, cfg.generator
    if path is None:
        return  # the tiny model is built in code
    where = f"model.path={path}"
    if not os.path.isdir(path):
        raise InputError(f"{where}: no such folder (an HF model folder with config.json and a tokenizer)")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise InputError(f"{where}: no config.json in the folder (is it the model folder, not its parent?)")
    try:
        with open(cfg_file) as f:
            json.load(f)
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - any reason transformers cannot read it is the user's to fix
        raise InputError(f"{where}: config.json cannot be read: {_first_line(e)}") from None
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{where}: the tokenizer cannot be loaded: {_first_line(e)}") from None
    vocab = getattr(config, "vocab_size", None)
    if vocab and len(tok) > int(vocab):
        raise InputError(f"{where}: the tokenizer has {len(tok)} tokens but the embedding only {vocab} rows "
                         "(config.json vocab_size): token ids past it would crash the model")
    archs: List[str] = list(getattr(config, "architectures", None) or [])
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise InputError(f"{where}: model_type '{config.model_type}' is not a causal LM transformers knows")
    if g.backend != "vllm":
        return
    supported, head_sizes = vllm_cpu_support()
    if not any(a in supported for a in archs):
        raise InputError(f"{where}: architectures {archs} are not implemented by vLLM; use generator.backend=hf")
    if float(g.num_gpus_per_actor) == 0:  # the engine runs on CPU: vLLM's CPU attention kernels
        hd = _head_dim(config)
        if hd not in head_sizes:
            raise InputError(f"{where}: head_dim={hd} has no vLLM CPU attention kernel (supported: "
                             f"{', '.join(map(str, head_sizes))}); use generator.backend=hf or a model with one of those")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def check_gpu_node(cfg: Any) -> None:
    """GPUs asked for, and this node has an NVIDIA driver (``nvidia-smi`` answers) whose GPUs
    torch cannot see: one line naming the driver version (the CUDA 13 wheels need >= 580), before
    any pool starts. A node without a driver fails too when the run would start a local Ray (no GPU
    could ever join it); joining a cluster (a CPU head pod) it is skipped: each GPU actor checks
    its own node at start-up (``dispo_ray.infra.devices.check_cuda_startup``). Nothing is
    imported or run when no pool asks for GPUs."""
    from dispo_ray.infra.devices import cuda_startup_error, nvidia_driver_version, uses_cuda

    asked = max(float(cfg.learner.num_gpus_per_actor), float(cfg.generator.num_gpus_per_actor))
    if not uses_cuda(asked):
        return
    driver = nvidia_driver_version()
    if driver is None:
        from dispo_ray.infra.placement import cluster_address

        if cluster_address(cfg) is None:  # a local Ray: its GPUs can only be this machine's
            pool = "learner" if float(cfg.learner.num_gpus_per_actor) > 0 else "generator"
            raise InputError(f"{pool}.num_gpus_per_actor={float(getattr(cfg, pool).num_gpus_per_actor):g} (e.g. +preset=gpu) "
                             f"asks for GPUs, but this machine has no NVIDIA driver (nvidia-smi not found) and the "
                             f"run would start a local Ray: run it on a GPU node, or join a cluster (cluster.address)")
        return
    import torch

    msg = cuda_startup_error(asked, torch.cuda.is_available(), driver, torch.version.cuda, "the run")
    if msg:
        raise InputError(msg)


def check_inputs(cfg: Any) -> None:
    """All checks of user inputs; raises :class:`InputError` on the first problem."""
    check_data_files(cfg)
    check_model_folder(cfg)
    check_gpu_node(cfg)
