"""Infrastructure (config, devices, placement, checkpoints, run state, stop signals, failures, metrics):
changes when the cluster or the machinery does. The weight sync has its own package, dispo_ray.sync."""
