"""Corrections: pixels a user painted, stored in the run, used to fine-tune and to review."""
