"""Learners: turn batches of scored rollouts into parameter updates with TRL's losses."""
