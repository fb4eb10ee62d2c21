"""The registry mechanism itself; each registry's contents have contract tests of their own."""

import argparse

import pytest

from napari_histo_wsss.core.config.presets import METHODS
from napari_histo_wsss.core.errors import ConfigError
from napari_histo_wsss.core.registry import Registry, RegistryNames


def test_registered_entries_are_found_in_order():
    things = Registry("thing")

    @things.register("b")
    def second():
        return 2

    things.add("a", 1)
    assert things.names() == ("b", "a")
    assert things.get("b") is second and things.get("a") == 1
    assert "a" in things and "c" not in things and len(things) == 2


def test_unknown_name_is_one_config_error_listing_the_choices():
    things = Registry("loss")
    things.add("ce", object())
    things.add("onss", object())
    with pytest.raises(ConfigError, match=r"unknown loss 'x': choose one of ce, onss"):
        things.get("x")
    with pytest.raises(ConfigError):
        things.check(None)


def test_a_name_cannot_be_registered_twice():
    things = Registry("thing")
    things.add("a", 1)
    with pytest.raises(ValueError, match="twice"):
        things.add("a", 2)


def test_a_temporary_entry_can_be_removed():
    things = Registry("thing")
    things.add("a", 1)
    things.add("b", 2)
    things.remove("a")
    assert things.names() == ("b",)
    with pytest.raises(ConfigError, match="unknown thing 'a'"):
        things.remove("a")


def test_registry_names_serve_as_argparse_choices():
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", metavar="METHOD",
                        choices=RegistryNames("napari_histo_wsss.core.config.presets", "METHODS"),
                        help="one of %(choices)s")
    assert parser.parse_args(["--method", "esfan"]).method == "esfan"
    assert ", ".join(METHODS.names()) in " ".join(parser.format_help().split())  # unwrapped
    with pytest.raises(SystemExit):
        parser.parse_args(["--method", "nope"])
    # Registered after the parser was built: the names are read when needed.
    METHODS.add("later", METHODS.get("mlps"))
    try:
        assert parser.parse_args(["--method", "later"]).method == "later"
    finally:
        METHODS.remove("later")
