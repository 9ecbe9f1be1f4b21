"""The step-cost model for clusters (docs/scaling.md): ``model.py`` holds the inputs (each with its
source) and the equations, ``checks.py`` the calibrations, the check against published numbers and
the sizing table, ``__main__.py`` the command (``python -m dispo_ray.study.cost_model``)."""
from dispo_ray.study.cost_model.checks import (  # noqa: F401
    VERL_MEDIAN, calibrate_decode_floor, calibrate_decode_floor_tp1, calibrate_verl_median, check_rows, sizing_rows)
from dispo_ray.study.cost_model.model import (  # noqa: F401
    DECODE_FLOOR_TP1_S, DECODE_FLOOR_TP_S, GPUS, MODELS, Lengths, Setup, decode_iteration_s, engine_batch_limit,
    generate_s, step, sync_s, train_s, zero_comm_s)
