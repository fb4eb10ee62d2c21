"""Dataset descriptions: class names, colours, background index and label format.

The three public WSSS datasets differ only in these facts, so loaders, metrics and palettes take a
``DatasetSpec`` instead of hard-coding any of them. Users bring their own classes with
``custom_spec`` (``--classes`` / ``--background`` on the command line).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import ConfigError

Colour = tuple[int, int, int]

#: Colours for user-defined classes (distinct, readable on H&E); background is always white.
_CUSTOM_COLOURS: tuple[Colour, ...] = (
    (205, 51, 51), (0, 160, 0), (65, 105, 225), (255, 165, 0), (153, 0, 255),
    (0, 200, 200), (200, 0, 150), (120, 80, 20), (128, 128, 0), (0, 0, 128),
)
WHITE: Colour = (255, 255, 255)


@dataclass(frozen=True)
class DatasetSpec:
    """What the labels of a dataset mean.

    ``class_names`` are the tissue classes that patch labels and metrics count; index
    ``background_index`` (== number of tissue classes) marks white background / excluded pixels
    in masks, never a scored class. ``white_plane`` says whether pseudo-masks get the white
    background plane (MLPS: gray > 200, components < 50 px removed).
    """

    name: str
    class_names: tuple[str, ...]
    colours: tuple[Colour, ...]
    label_format: str = "any"  # "space" "[a b c d]", "packed" "[abcd]", "comma" "[a, b, c]", "any"
    white_plane: bool = True
    white_threshold: int = 200
    white_min_size: int = 50
    mean: tuple[float, float, float] | None = None  # RGB 0-255 statistics, where known
    std: tuple[float, float, float] | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.class_names) < 1:
            raise ConfigError("a dataset needs at least one tissue class")
        if len(set(self.class_names)) != len(self.class_names):
            raise ConfigError(f"class names must be unique, got {list(self.class_names)}")
        if len(self.colours) != len(self.class_names) + 1:
            raise ConfigError("give one colour per class plus one for the background")

    @property
    def num_classes(self) -> int:
        """Tissue classes (the background index is not one of them)."""
        return len(self.class_names)

    @property
    def background_index(self) -> int:
        return len(self.class_names)

    @property
    def all_names(self) -> tuple[str, ...]:
        """Class names followed by the background entry, indexed like mask values."""
        return (*self.class_names, "background")

    def palette(self) -> list[int]:
        """A 768-entry PIL palette: class colours, then background, then black."""
        flat = [channel for colour in self.colours for channel in colour]
        return flat + [0] * (768 - len(flat))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["class_names"] = list(self.class_names)
        data["colours"] = [list(c) for c in self.colours]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> DatasetSpec:
        data = dict(data)
        data["class_names"] = tuple(data["class_names"])
        data["colours"] = tuple(tuple(int(v) for v in c) for c in data["colours"])
        for key in ("mean", "std"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


LUAD_HISTOSEG = DatasetSpec(
    name="luad-histoseg",
    class_names=("TE", "NEC", "LYM", "TAS"),
    colours=((205, 51, 51), (0, 255, 0), (65, 105, 225), (255, 165, 0), WHITE),
    label_format="space",
    white_plane=True,
    mean=(187.5, 129.015, 176.592),
    std=(47.85, 57.923, 39.454),
)

BCSS_WSSS = DatasetSpec(
    name="bcss-wsss",
    class_names=("TUM", "STR", "LYM", "NEC"),
    colours=((255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255), WHITE),
    label_format="packed",
    # White regions in breast tissue are meaningful (fat): MLPS leaves them unlabelled.
    white_plane=False,
    mean=(180.18, 121.68, 170.13),
    std=(50.73, 58.032, 44.703),
)

WSSS4LUAD = DatasetSpec(
    name="wsss4luad",
    class_names=("tumor", "stroma", "normal"),
    colours=((0, 64, 128), (64, 128, 0), (243, 152, 0), WHITE),
    label_format="comma",
    white_plane=True,
    white_threshold=220,
    white_min_size=250,
)

BUILTIN_SPECS: dict[str, DatasetSpec] = {
    spec.name: spec for spec in (LUAD_HISTOSEG, BCSS_WSSS, WSSS4LUAD)
}


def builtin_spec(name: str) -> DatasetSpec:
    try:
        return BUILTIN_SPECS[name.lower()]
    except KeyError:
        known = ", ".join(BUILTIN_SPECS)
        raise ConfigError(f"unknown dataset '{name}': built-in datasets are {known}") from None


def custom_spec(
    class_names: list[str] | str,
    background: int | None = None,
    name: str = "custom",
    white_plane: bool = True,
) -> DatasetSpec:
    """A description for the user's own classes (``--classes A,B,C --background 3``).

    The background index must equal the number of classes: masks store tissue classes as
    0..C-1 and background as C, as all three public datasets do.
    """
    names = [n.strip() for n in class_names.split(",")] if isinstance(class_names, str) \
        else [n.strip() for n in class_names]
    names = [n for n in names if n]
    if not names:
        raise ConfigError("--classes needs at least one class name, e.g. --classes tumour,stroma")
    if background is not None and background != len(names):
        raise ConfigError(
            f"--background {background} does not fit {len(names)} classes: the background "
            f"index must come right after the classes ({len(names)})"
        )
    if len(names) > len(_CUSTOM_COLOURS):
        raise ConfigError(f"at most {len(_CUSTOM_COLOURS)} classes are supported")
    colours = (*_CUSTOM_COLOURS[: len(names)], WHITE)
    return DatasetSpec(name=name, class_names=tuple(names), colours=colours,
                       white_plane=white_plane)
