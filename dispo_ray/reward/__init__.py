"""Reward verification: answer extraction (answers.py), scoring against the ground truth with
math-verify (scoring.py), and the sandboxed process that runs it on untrusted model output (sandbox.py)."""
