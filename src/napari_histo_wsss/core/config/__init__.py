"""Run configuration: the settings dataclasses and the method presets that fill them."""
