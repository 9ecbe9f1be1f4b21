"""The regime study and lab (runs, verdicts, plots), and the step-cost model for clusters
(cost_model/, docs/scaling.md): changes when the study or the model does."""
