"""Infrastructure (config, devices, placement, weight sync, run state, failures): changes when the cluster or the machinery does."""
