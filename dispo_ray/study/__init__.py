"""The regime study and lab (runs, verdicts, plots): changes when the study does."""
