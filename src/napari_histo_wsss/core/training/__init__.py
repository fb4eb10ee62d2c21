"""The one training loop every trainer runs: state, stepping, stop, resume and events."""
