"""``python -m dispo_ray.study ...``: the regime study (see :mod:`dispo_ray.study.runner`)."""
from dispo_ray.study import runner

if __name__ == "__main__":
    runner.main()
