"""Entry point: ``python -m dispo_ray.main [hydra overrides]`` (also the ``dispo-train`` script).

Composes ``conf/``, validates every value and then the user's data files and model folder
(``dispo_ray.data.preflight``) before anything starts: a user error prints one line naming the key,
file or row and exits 2. A run that fails later prints one line naming the root cause
(``dispo_ray.infra.failures.describe``: the engine's own error, Ray's memory-monitor verdict, ...), keeps
the full traceback in ``<run_dir>/error.log`` and exits 1. SIGTERM / SIGINT stop it gracefully
(``dispo_ray.infra.stop``): a checkpoint, one line with the resume command, exit 143 / 130.
"""
from __future__ import annotations

import os
import sys
import traceback

import hydra
from omegaconf import DictConfig

from dispo_ray.infra.config import CONF_DIR, ConfigError, check_override_keys, load_config


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from dispo_ray.data.preflight import check_inputs

    try:
        root = load_config(cfg)
        check_inputs(root)
    except ConfigError as e:
        _fail(str(e), 2)
    from dispo_ray.rollout.driver import run  # Ray and the actors are imported only after validation
    from dispo_ray.infra.failures import describe
    from dispo_ray.infra.stop import STOP, StopNow

    try:
        summary = run(root)
        if summary.get("stopped_by_signal"):
            sys.exit(STOP.exit_code)  # 143 (SIGTERM) / 130 (SIGINT); the line was printed
    except StopNow as e:
        _fail(str(e), 128 + e.signum)
    except (KeyboardInterrupt, SystemExit):
        raise
    except ConfigError as e:  # a data or config problem found while loading (e.g. every prompt too long)
        _fail(str(e), 2)
    except Exception as e:  # noqa: BLE001 - one line for the console, the whole story in the log
        log = os.path.join(os.path.abspath(root.trainer.run_dir), "error.log")
        try:
            os.makedirs(os.path.dirname(log), exist_ok=True)
            with open(log, "w") as f:
                traceback.print_exc(file=f)
            where = f" (traceback: {log})"
        except OSError:
            where = ""
        _fail(describe(e) + where, 1)


def main() -> None:
    try:
        check_override_keys(sys.argv[1:])
    except ConfigError as e:
        _fail(str(e), 2)
    _hydra_main()


if __name__ == "__main__":
    main()
