"""Prompt data: verl-style records with a resumable cursor (records.py) and the preflight checks of
the user's data files and model folder (preflight.py): changes when the inputs do."""
