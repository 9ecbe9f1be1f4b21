"""Entry point: ``python -m dispo_ray.main [hydra overrides]`` (also the ``dispo-train`` script).

Composes ``conf/``, validates every value before anything starts (a user error prints one line
naming the key and exits 2), then hands the run to the driver.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from dispo_ray.config import CONF_DIR, ConfigError, check_override_keys, load_config


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        root = load_config(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from dispo_ray.driver import run  # Ray and the actors are imported only after validation

    run(root)


def main() -> None:
    try:
        check_override_keys(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
