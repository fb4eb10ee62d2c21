"""The registry mechanism itself; each registry's contents have contract tests of their own."""

import pytest

from napari_histo_wsss.core.errors import ConfigError
from napari_histo_wsss.core.registry import Registry


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
