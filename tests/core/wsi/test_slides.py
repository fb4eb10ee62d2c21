"""Slides open lazily as RGB uint8 pyramids with their mpp, whatever the format; bad files fail
with one clear SlideError naming the file."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

from napari_histo_wsss.core.errors import SlideError
from napari_histo_wsss.core.wsi.slides import (
    Slide,
    best_level_for_mpp,
    open_slide,
    read_region,
    read_thumbnail,
)

WSI = Path(__file__).resolve().parents[4] / "shared" / "data" / "wsi"


@pytest.fixture(scope="module")
def tissue(sample_slide_path) -> np.ndarray:
    """Real H&E pixels (the bundled slide's level 1, 1483 x 1110) to build test files from."""
    with tifffile.TiffFile(sample_slide_path) as tiff:
        return tiff.series[0].levels[1].asarray()[:600, :800]


def write_ome_pyramid(path, image, mpp=0.5, levels=3):
    """A pyramidal OME-TIFF the way the ecosystem writes them: SubIFDs + subfiletype=1."""
    with tifffile.TiffWriter(path, ome=True) as tiff:
        options = dict(tile=(128, 128), photometric="rgb", compression="zlib")
        tiff.write(image, subifds=levels - 1, metadata={"PhysicalSizeX": mpp,
                   "PhysicalSizeY": mpp, "axes": "YXS"}, **options)
        for level in range(1, levels):
            step = 2**level
            tiff.write(image[::step, ::step], subfiletype=1, **options)


def test_real_pyramid_opens_with_levels_and_mpp(sample_slide_path):
    with open_slide(sample_slide_path) as slide:
        assert isinstance(slide, Slide)
        assert [level.shape for level in slide.levels] == [
            (2967, 2220, 3), (1483, 1110, 3), (741, 555, 3)]
        assert all(isinstance(level, da.Array) and level.dtype == np.uint8
                   for level in slide.levels)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.downsamples[0] == 1.0
        assert slide.downsamples[2] == pytest.approx(4.0, rel=1e-3)
        assert slide.levels[0].chunksize[:2] == (256, 256)  # tiles, never a whole level
        assert slide.name == "cmu-1-small-region-pyramid"
        assert slide.metadata["mpp"] == pytest.approx(0.499)


def test_read_region_pads_outside_the_image_with_white(sample_slide_path):
    with open_slide(sample_slide_path) as slide:
        height, width = slide.level_shape(2)
        inside = slide.levels[2][:20, :30].compute()
        window = read_region(slide, 2, -10, -5, 40, 50)
        assert window.shape == (40, 50, 3) and window.dtype == np.uint8
        np.testing.assert_array_equal(window[10:30, 5:35], inside)
        assert (window[:10] == 255).all() and (window[:, :5] == 255).all()
        corner = read_region(slide, 2, height - 4, width - 4, 8, 8)
        assert (corner[4:] == 255).all() and (corner[:, 4:] == 255).all()
        assert (read_region(slide, 2, height + 5, 0, 4, 4) == 255).all()


def test_ome_tiff_pyramid_written_with_subifds(tmp_path, tissue):
    path = tmp_path / "pyramid.ome.tif"
    write_ome_pyramid(path, tissue, mpp=0.25)
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.25)
        assert slide.metadata["format"] == "ome"
        assert [level.shape[:2] for level in slide.levels] == [(600, 800), (300, 400), (150, 200)]
        np.testing.assert_array_equal(slide.levels[1].compute(), tissue[::2, ::2])
        assert slide.name == "pyramid"


def test_single_level_tiff_gets_a_lazy_pyramid(tmp_path, tissue):
    path = tmp_path / "flat.tif"
    # 0.5 um/px as TIFF resolution tags (pixels per centimetre)
    tifffile.imwrite(path, tissue, tile=(64, 64), photometric="rgb",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.5)
        assert slide.levels[0].chunksize[:2] == (64, 64)
        assert [level.shape[:2] for level in slide.levels] == [(600, 800), (300, 400)]
        expected = tissue[:2, :2].reshape(1, 2, 1, 2, 3).astype(float).mean(axis=(1, 3))
        np.testing.assert_array_equal(slide.levels[1][:1, :1].compute(), np.round(expected))


def test_striped_tiff_is_read_by_strips_not_whole(tmp_path, tissue):
    path = tmp_path / "striped.tif"
    tifffile.imwrite(path, tissue, photometric="rgb", rowsperstrip=16)
    with open_slide(path) as slide:
        assert slide.levels[0].chunksize[0] < tissue.shape[0]
        assert slide.mpp is None
        np.testing.assert_array_equal(read_region(slide, 0, 100, 200, 10, 10),
                                      tissue[100:110, 200:210])


def test_grey_16_bit_and_rgba_become_rgb_uint8(tmp_path, tissue):
    grey = tmp_path / "grey16.tif"
    tifffile.imwrite(grey, (tissue[..., 0].astype(np.uint16) * 257))
    with open_slide(grey) as slide:
        pixels = slide.levels[0][:5, :5].compute()
        assert pixels.shape == (5, 5, 3) and pixels.dtype == np.uint8
        np.testing.assert_array_equal(pixels[..., 2], tissue[:5, :5, 0])

    from PIL import Image

    rgba = np.dstack([tissue[:64, :64], np.full((64, 64), 255, np.uint8)])
    rgba[:8, :8, 3] = 0  # transparent corner: shown as white glass
    png = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(png)
    with open_slide(png) as slide:
        pixels = slide.levels[0].compute()
        assert (pixels[:8, :8] == 255).all()
        np.testing.assert_array_equal(pixels[8:, 8:], tissue[8:64, 8:64])


@pytest.mark.parametrize("style", ["ngff-0.4", "ngff-0.5"])
def test_ome_zarr_group_in_both_metadata_styles(tmp_path, tissue, style):
    path = tmp_path / "image.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=2 if style == "ngff-0.4" else 3)
    datasets = []
    for level in range(2):
        planar = np.moveaxis(tissue[:: 2**level, :: 2**level], -1, 0)  # (c, y, x) as NGFF has
        root.create_array(str(level), data=planar, chunks=(3, 128, 128))
        datasets.append({"path": str(level), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 0.3 * 2**level, 0.3 * 2**level]}]})
    multiscales = [{"version": "0.4", "axes": [
        {"name": "c", "type": "channel"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"}], "datasets": datasets}]
    if style == "ngff-0.4":
        root.attrs["multiscales"] = multiscales
    else:
        root.attrs["ome"] = {"version": "0.5", "multiscales": multiscales}
    with open_slide(path) as slide:
        assert slide.backend == "zarr"
        assert slide.mpp == pytest.approx(0.3)
        assert [level.shape for level in slide.levels] == [(600, 800, 3), (300, 400, 3)]
        np.testing.assert_array_equal(slide.levels[1].compute(), tissue[::2, ::2])


def test_best_level_for_mpp_picks_the_level_not_coarser_than_needed(sample_slide_path):
    with open_slide(sample_slide_path) as slide:
        assert best_level_for_mpp(slide, 0.499) == (0, 1.0)
        assert best_level_for_mpp(slide, 1.0) == (1, 1.0)  # 2.0003x is within 1%
        level, factor = best_level_for_mpp(slide, 1.5)
        assert level == 1 and factor == pytest.approx(1.5 / (0.499 * slide.downsamples[1]))
        level, factor = best_level_for_mpp(slide, 8.0)
        assert level == 2 and factor > 1
        assert best_level_for_mpp(slide, 0.25)[1] == pytest.approx(0.25 / 0.499)  # upsampling


def test_best_level_needs_an_mpp(tmp_path, tissue):
    path = tmp_path / "no-mpp.tif"
    tifffile.imwrite(path, tissue, tile=(64, 64), photometric="rgb")
    with open_slide(path) as slide, pytest.raises(SlideError, match="no-mpp.tif"):
        best_level_for_mpp(slide, 1.0)


def test_thumbnail_is_small_and_streams(sample_slide_path):
    with open_slide(sample_slide_path) as slide:
        thumbnail = read_thumbnail(slide, max_side=300)
        assert max(thumbnail.shape[:2]) <= 300 and thumbnail.dtype == np.uint8
        assert max(thumbnail.shape[:2]) > 150


@pytest.mark.parametrize("content", [b"", b"IJrEr1vVVJCw not a slide at all", b"II*\x00\x08"])
def test_bad_files_raise_one_clear_error_naming_the_file(tmp_path, content):
    path = tmp_path / "patient-7.svs"
    path.write_bytes(content)
    with pytest.raises(SlideError) as caught:
        open_slide(path)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message


def test_truncated_tiff_fails_at_open_not_later(tmp_path, tissue):
    path = tmp_path / "truncated.tif"
    tifffile.imwrite(path, tissue, tile=(64, 64), photometric="rgb", compression="zlib")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(SlideError, match="truncated.tif: file is truncated"):
        open_slide(path)


def test_missing_file(tmp_path):
    with pytest.raises(SlideError, match="file not found"):
        open_slide(tmp_path / "nowhere.svs")


def test_openslide_backend_reads_the_same_pixels(sample_slide_path):
    pytest.importorskip("openslide")
    from napari_histo_wsss.core.wsi.slides import _open_with_openslide

    slide = _open_with_openslide(sample_slide_path)
    assert slide is not None and slide.backend == "openslide"
    with slide, open_slide(sample_slide_path) as reference:
        assert slide.mpp == pytest.approx(0.499)
        assert [level.shape for level in slide.levels] == [
            level.shape for level in reference.levels]
        ours = read_region(slide, 1, 300, 200, 64, 64).astype(int)
        theirs = read_region(reference, 1, 300, 200, 64, 64).astype(int)
        assert np.abs(ours - theirs).mean() < 2  # JPEG decoders may differ by a level or so


@pytest.mark.skipif(not WSI.exists(), reason="needs ../shared/data/wsi")
def test_real_svs_files_from_shared_data():
    with open_slide(WSI / "cmu-1-small-region.svs") as slide:
        assert slide.mpp == pytest.approx(0.499)
        assert slide.metadata["format"] == "svs"
        assert slide.shape == (2967, 2220) and len(slide.levels) > 1  # lazy pyramid added
    with open_slide(WSI / "tcga-cr-7395-01a-01-ts1.svs") as slide:
        assert slide.mpp is None  # this export carries no MPP
        assert [level.shape[:2] for level in slide.levels] == [(3567, 4443), (1783, 2221)]
        assert slide.downsamples[1] == pytest.approx(2.0005, abs=1e-3)
        assert read_region(slide, 1, 800, 1000, 32, 32).std() > 0  # JPEG 2000 decodes
    with pytest.raises(SlideError, match="broken.svs: not a readable slide"):
        open_slide(WSI / "broken.svs")
