"""The run directory and its one-file checkpoints: where every stage reads and writes."""
