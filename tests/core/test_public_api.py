"""The public library API in ``napari_histo_wsss.core``: complete, and lazy."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import napari_histo_wsss
import napari_histo_wsss.core as core

SRC = Path(napari_histo_wsss.__file__).resolve().parents[1]


def _fresh_interpreter(code: str) -> dict:
    """Run ``code`` in a new Python (nothing imported yet) and return the JSON it prints."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, check=True)
    return json.loads(result.stdout)


def test_every_public_name_resolves_to_an_object_of_that_name():
    assert len(core.__all__) == len(set(core.__all__))
    assert sorted(core._HOME_OF) == sorted(core.__all__)
    for name in core.__all__:
        value = getattr(core, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__name__ == name
            assert value.__module__.startswith("napari_histo_wsss.core.")


def test_public_api_covers_the_documented_entry_points():
    expected = {
        "prepare_run", "run_pipeline", "RunConfig", "preset", "find_dataset", "DatasetSpec",
        "load_eval_set", "RunDirectory", "load_predictor", "predict_image", "evaluate",
        "segment_slide", "segment_slides", "open_slide", "segmentation_to_geojson",
        "StopToken", "run_to_completion", "Started", "Batch", "Epoch", "Done",
        "HistoWsssError", "DatasetError", "SlideError", "CheckpointError", "ConfigError",
    }
    assert expected <= set(core.__all__)
    assert set(core.__all__) <= set(dir(core))


def test_every_user_error_class_is_public():
    from napari_histo_wsss.core import errors

    error_classes = {name for name, value in vars(errors).items()
                     if inspect.isclass(value) and issubclass(value, errors.HistoWsssError)}
    assert error_classes <= set(core.__all__)


def test_unknown_name_is_an_attribute_error():
    try:
        core.no_such_name  # noqa: B018
    except AttributeError as error:
        assert "no_such_name" in str(error)
    else:
        raise AssertionError("an unknown name resolved")


def test_importing_core_alone_imports_neither_torch_nor_any_subpackage():
    loaded = _fresh_interpreter(
        "import json, sys\n"
        "import napari_histo_wsss.core\n"
        "print(json.dumps(sorted(m for m in sys.modules\n"
        "    if m.split('.')[0] in ('torch', 'numpy', 'napari_histo_wsss'))))\n"
    )
    assert loaded == ["napari_histo_wsss", "napari_histo_wsss.core"]


def test_importing_one_submodule_does_not_load_the_whole_library():
    loaded = _fresh_interpreter(
        "import json, sys\n"
        "import napari_histo_wsss.core.stage1.cams\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('napari_histo_wsss'))))\n"
    )
    assert "napari_histo_wsss.core.stage1.cams" in loaded
    for unrelated in ("pipeline", "wsi", "hisynseg", "stage2", "inference"):
        assert f"napari_histo_wsss.core.{unrelated}" not in loaded


def test_a_public_name_loads_only_its_own_module():
    loaded = _fresh_interpreter(
        "import json, sys\n"
        "from napari_histo_wsss.core import StopToken, ConfigError\n"
        "print(json.dumps(sorted(m for m in sys.modules\n"
        "    if m.startswith(('napari_histo', 'torch')))))\n"
    )
    assert loaded == ["napari_histo_wsss", "napari_histo_wsss.core",
                      "napari_histo_wsss.core.errors", "napari_histo_wsss.core.events"]
