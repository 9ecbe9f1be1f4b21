"""Placeholder until the driver lands: prints the validated config."""
from dispo_ray.config import RootConfig, to_dict


def run(cfg: RootConfig) -> None:
    import json
    print(json.dumps(to_dict(cfg)["algorithm"], indent=1))
