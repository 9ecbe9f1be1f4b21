"""Data and rewards (prompt records, the tiny task, the answer checker and its sandbox): changes when the inputs or their scoring do."""
