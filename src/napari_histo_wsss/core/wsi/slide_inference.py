"""Whole-slide segmentation: lazy, tiled, seam-free, resumable, written chunk by chunk.

``segment_slide`` reads windows with a halo at a chosen resolution, skips windows with no
tissue, predicts them in batches, blends the overlaps (:mod:`.tiling`) and writes finished
rows of blocks into an OME-Zarr (:mod:`.ome_zarr_labels`). Reading runs ahead in a thread
pool and writing in its own thread, so decoding, the model and the disk overlap.

Memory stays flat with slide size: the slide is processed in bands of columns sized to a fixed
budget, and a band keeps one row of windows (plus its overlap) in memory. The window column at
a band's left edge is predicted again for the blend, a few percent of extra compute.

Labels are the most probable class; glass inside predicted tiles becomes background (0) by the
dataset's white-plane rule where the dataset has one (WSSS4LUAD, LUAD-HistoSeg), like the masks
the model was trained on.

An interrupted run leaves ``complete: false`` and a done map of written blocks; running it
again with the same settings continues from there, and a run whose settings differ is refused.
While a run writes, it holds the lock ``.<name>.lock`` beside the output (core/runs/locks.py), so
a second run on the same output, even one that would start over, is refused.
Out of GPU memory, the batch is halved and the run goes on.

A stop request is honoured within a fraction of a second, not after the batch: the model
runs in its own thread while the job waits for it, looking at the stop token every
``STOP_POLL_SECONDS``; on a request the job leaves the running batch to finish on its own
(its predictions are dropped; nothing of it was written, so it is predicted again on resume)
and ends. Batches keep their size, so the path is not slowed (one batch of 8 512-px tiles takes
~6 s on a loaded 2-core CPU; smaller calls were up to 3x slower per tile there). A predictor
runs one call at a time, so a run started at once after a stop waits for the left batch.
The progress events count every tissue tile of the slide, so a resumed run starts at the
tiles already done.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ... import __version__
from ..data.classes import DatasetSpec
from ..errors import ConfigError, HistoWsssError, SlideError
from ..events import Batch, Done, Event, Message, Preview, Started, StopToken, run_to_completion
from ..inference.tiling import BLEND_MODES, RowBlender, TileGrid
from ..runs.locks import locked_job, sibling_lock_path
from . import ome_zarr_labels as store
from .slides import Slide, best_level_for_mpp, open_slide, read_region, slide_name
from .tissue import TissueMask
from .tissue import tissue_mask as compute_tissue_mask

STAGE = "segment-slide"
#: Memory for blending one band of columns; sets how wide bands are (not the slide size).
BAND_BUDGET_BYTES = 64 * 2**20
#: Windows read ahead of the model, in batches.
READ_AHEAD_BATCHES = 2
#: Finished rows waiting for the writer before the model waits for the disk.
WRITE_QUEUE = 2
#: How often the job looks at the stop token while the model predicts a batch.
STOP_POLL_SECONDS = 0.05
#: One lock per predictor: its calls never overlap (a batch left running by a stopped job and
#: the next job's first batch), whatever the engine's thread safety.
_PREDICTOR_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _predictor_lock(predictor) -> threading.Lock:
    with _LOCKS_GUARD:
        try:
            return _PREDICTOR_LOCKS.setdefault(predictor, threading.Lock())
        except TypeError:  # not weakly referenceable: one lock per job is the best there is
            return threading.Lock()


class Predictor(Protocol):
    """What slide inference needs from a trained model (``core.predict.load_predictor``)."""

    spec: DatasetSpec
    mpp: float | None
    config: dict

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """uint8 ``(N, h, w, 3)`` -> float32 class probabilities ``(N, C, h, w)``."""


def engine_record(predictor: Predictor) -> dict[str, str] | None:
    """Which inference engine runs ``predictor`` (``Engine.record``), for the output's
    metadata; None for a predictor without one. Duck-typed: this module needs no torch."""
    record = getattr(getattr(predictor, "engine", None), "record", None)
    return record() if callable(record) else None


@dataclass(frozen=True)
class Resolution:
    """Where the model looks: pyramid ``level`` shrunk by ``factor`` into a ``shape`` grid."""

    level: int
    factor: float
    shape: tuple[int, int]
    level0_downsample: float
    mpp: float | None


@dataclass(frozen=True)
class _Window:
    band: int
    row: int
    col: int
    has_tissue: bool
    ends_row: bool
    primes: bool  # re-predicted only to rebuild the overlap carried into a resumed row


@dataclass
class CohortResult:
    """Outputs of ``segment_slides``: written zarr paths, and slides that failed with why."""

    outputs: list[Path] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)


def choose_resolution(
    slide: Slide,
    *,
    model_mpp: float | None,
    target_mpp: float | None = None,
    level: int | None = None,
) -> tuple[Resolution, str | None]:
    """The working resolution, and a note for the user when it had to be guessed.

    Priority: an explicit ``level``; else ``target_mpp``; else the model's training mpp; else
    level 0 (when the slide or the model does not know its mpp).
    """
    if level is not None and target_mpp is not None:
        raise ConfigError("give either a level or a target mpp, not both")
    note = None
    if level is not None:
        if not 0 <= level < len(slide.levels):
            raise ConfigError(
                f"level {level} does not exist: {slide.name} has levels 0-{len(slide.levels) - 1}"
            )
        factor = 1.0
    else:
        wanted = target_mpp if target_mpp is not None else model_mpp
        if target_mpp is not None or (wanted is not None and slide.mpp is not None):
            level, factor = best_level_for_mpp(slide, wanted)  # SlideError without a slide mpp
        else:
            level, factor = 0, 1.0
            missing = "slide" if slide.mpp is None else "model"
            note = f"the {missing} has no microns-per-pixel, so level 0 is used as it is"
    height, width = slide.level_shape(level)
    shape = (max(1, round(height / factor)), max(1, round(width / factor)))
    level0_downsample = slide.downsamples[level] * factor
    mpp = None if slide.mpp is None else slide.mpp * level0_downsample
    return Resolution(level, factor, shape, level0_downsample, mpp), note


def segment_slide(
    predictor: Predictor,
    slide: Slide | str | Path,
    out_path: str | Path,
    *,
    target_mpp: float | None = None,
    level: int | None = None,
    tile: int = 512,
    halo: int = 64,
    blend: str = "gaussian",
    batch_size: int = 8,
    tissue_mask: bool = True,
    stop: StopToken | None = None,
    resume: bool = True,
    write_cams: bool | None = None,
    read_workers: int = 2,
    band_budget_bytes: int = BAND_BUDGET_BYTES,
) -> Generator[Event, None, None]:
    """Segment ``slide`` into the OME-Zarr ``out_path``; a job generator ending with Done.

    ``write_cams``: also store the predictor's class activation maps (``predict_cams``, same
    contract as ``predict_batch``) as ``cams/``; None stores them when the predictor has them.
    """
    owns_slide = not isinstance(slide, Slide)
    if owns_slide:
        slide = open_slide(slide)
    try:
        job = _SlideJob(
            predictor, slide, Path(out_path), target_mpp=target_mpp, level=level, tile=tile,
            halo=halo, blend=blend, batch_size=batch_size, use_tissue_mask=tissue_mask,
            stop=stop, resume=resume, write_cams=write_cams, read_workers=read_workers,
            band_budget_bytes=band_budget_bytes,
        )
        out_path = Path(out_path)
        yield from locked_job(sibling_lock_path(out_path), out_path, STAGE, job.run())
    finally:
        if owns_slide:
            slide.close()


@dataclass
class _SlideOutput:
    """The OME-Zarr a slide job writes: the settings that identify it, its provenance, and
    opening it new or to resume (the bookkeeping, apart from the prediction loop)."""

    out_path: Path
    slide: Slide
    predictor: Predictor
    resolution: Resolution
    grid: TileGrid
    blend: str
    use_tissue_mask: bool
    maps: dict[str, list[str]]

    @property
    def spec(self) -> DatasetSpec:
        return self.predictor.spec

    def signature(self) -> dict[str, Any]:
        """Everything that changes the output; a resumed run must match it exactly."""
        stat = self.slide.path.stat()
        config_json = json.dumps(self.predictor.config, sort_keys=True, default=str)
        signature = {
            "slide": {"path": str(self.slide.path.resolve()), "size": stat.st_size,
                      "mtime": stat.st_mtime, "shape": list(self.slide.shape)},
            "predictor_config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
            "spec": self.spec.to_dict(),
            "level": self.resolution.level, "factor": round(self.resolution.factor, 6),
            "tile": self.grid.tile, "halo": self.grid.halo, "blend": self.blend,
            "tissue_mask": self.use_tissue_mask, "maps": self.maps, "version": __version__,
        }
        return json.loads(json.dumps(signature))

    def open(self, resume: bool, mask: TissueMask | None) -> Generator[Event, None, Any]:
        """The zarr group to write into, new or (``resume``) continued; None when the output
        is already complete. Refuses an output written with other settings."""
        signature = self.signature()
        if self.out_path.exists():
            if not self.out_path.is_dir() or (
                not store.is_segmentation(self.out_path) and any(self.out_path.iterdir())
            ):
                raise SlideError("exists and is not a segmentation; choose another output path",
                                 self.out_path)
            if resume and store.is_segmentation(self.out_path):
                previous = store.read_attrs(self.out_path)
                if previous.get("signature") != signature:
                    changed = _changed_keys(previous.get("signature") or {}, signature)
                    raise SlideError(
                        f"holds a run with other settings ({', '.join(changed)}); delete it, "
                        "choose another output path, or turn resume off", self.out_path)
                if previous.get("complete"):
                    yield Message(STAGE, f"{self.slide.name}: already complete ({self.out_path})")
                    return None
                import zarr

                yield Message(STAGE, f"{self.slide.name}: resuming {self.out_path}")
                return zarr.open_group(str(self.out_path), mode="r+")
            shutil.rmtree(self.out_path)
        unit = "micrometer" if self.resolution.mpp is not None else None
        pixel_size = self.resolution.mpp or self.resolution.level0_downsample
        root = store.create_segmentation(
            self.out_path, shape=self.resolution.shape, chunk=self.grid.stride, spec=self.spec,
            maps=self.maps, blocks=(self.grid.rows, self.grid.cols), pixel_size=pixel_size,
            unit=unit, attrs=self._provenance(signature, mask),
        )
        if mask is not None:
            store.write_tissue_mask(root, mask.mask, mask.downsample)
        return root

    def _provenance(self, signature, mask: TissueMask | None) -> dict[str, Any]:
        return {
            "signature": signature,
            "spec": self.spec.to_dict(),
            "slide": {"path": str(self.slide.path), "name": self.slide.name,
                      "shape": list(self.slide.shape), "mpp": self.slide.mpp,
                      "backend": self.slide.backend},
            "level0_downsample": self.resolution.level0_downsample,
            "mpp": self.resolution.mpp,
            "level": self.resolution.level,
            "factor": self.resolution.factor,
            "tile": self.grid.tile, "halo": self.grid.halo, "blend": self.blend,
            "predictor": {"config": json.loads(json.dumps(self.predictor.config, default=str)),
                          "mpp": getattr(self.predictor, "mpp", None)},
            "engine": engine_record(self.predictor),
            "tissue_fraction": None if mask is None else round(mask.fraction, 4),
            "package": {"name": "napari-histo-wsss", "version": __version__},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }


class _SlideJob:
    """One run of ``segment_slide``; the state that its steps share."""

    def __init__(self, predictor, slide, out_path, *, target_mpp, level, tile, halo, blend,
                 batch_size, use_tissue_mask, stop, resume, write_cams, read_workers,
                 band_budget_bytes):
        if blend not in BLEND_MODES:
            raise ConfigError(f"unknown blend mode '{blend}': use one of {', '.join(BLEND_MODES)}")
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        self.predictor, self.slide, self.out_path = predictor, slide, out_path
        self.spec: DatasetSpec = predictor.spec
        self.blend, self.batch_size, self.stop = blend, batch_size, stop
        self.use_tissue_mask, self.resume = use_tissue_mask, resume
        self.read_workers, self.band_budget_bytes = read_workers, band_budget_bytes
        self.resolution, self.note = choose_resolution(
            slide, model_mpp=getattr(predictor, "mpp", None), target_mpp=target_mpp, level=level
        )
        self.grid = TileGrid(*self.resolution.shape, tile, halo)
        if write_cams is None:
            write_cams = callable(getattr(predictor, "predict_cams", None))
        elif write_cams and not callable(getattr(predictor, "predict_cams", None)):
            raise ConfigError("write_cams needs a predictor with a predict_cams method")
        self.write_cams = write_cams
        self.maps = self._map_channels()
        self.bands = self._bands()
        self.output = _SlideOutput(out_path, slide, predictor, self.resolution, self.grid, blend,
                                   use_tissue_mask, self.maps)

    # ------------------------------------------------------------------ the job

    def run(self) -> Generator[Event, None, None]:
        started = time.perf_counter()
        if self.note:
            yield Message(STAGE, f"{self.slide.name}: {self.note}")
        mask = compute_tissue_mask(self.slide) if self.use_tissue_mask else None
        if self._stop_requested():
            yield from self._stopped()  # nothing written yet
            return
        root = yield from self.output.open(self.resume, mask)
        if root is None:
            yield Done(STAGE, self.out_path)
            return
        windows = self._plan(root, mask)
        remaining = sum(window.has_tissue for window in windows)
        total = self._tissue_tiles(mask)  # the whole slide's, so a resumed bar continues
        tissue_note = f", tissue {100 * mask.fraction:.0f}%" if mask is not None else ""
        factor = self.resolution.factor
        resized = "" if factor == 1 else f" resized x{1 / factor:.3g}"
        yield Message(
            STAGE,
            f"{self.slide.name}: level {self.resolution.level}{resized} "
            f"({_describe_mpp(self.resolution.mpp)}), {self.grid.rows}x{self.grid.cols} blocks, "
            f"{remaining} tiles to predict{tissue_note}",
        )
        yield Started(STAGE, total_epochs=1, batches_per_epoch=total)
        finished = yield from self._predict_and_write(root, windows, total,
                                                      max(total - remaining, 0))
        if finished:
            yield Message(STAGE, f"{self.slide.name}: building the pyramid")
            finished = store.build_pyramids(root, stopped=self._stop_requested)
        if not finished:
            yield from self._stopped()
            return
        store.mark_complete(root, seconds=round(time.perf_counter() - started, 2),
                            tiles_predicted=remaining, engine=engine_record(self.predictor))
        yield Done(STAGE, self.out_path)

    def _stop_requested(self) -> bool:
        return self.stop is not None and self.stop.requested

    def _stopped(self) -> Generator[Event, None, None]:
        yield Message(STAGE, f"stopped; run again with the same settings to resume "
                             f"({self.out_path})")
        yield Done(STAGE, self.out_path, stopped=True)

    def _predict_and_write(self, root, windows, total, done_tiles
                           ) -> Generator[Event, None, bool]:
        """The streaming loop; returns False when a stop request ended it early.
        ``done_tiles`` were predicted by an earlier, stopped run (where progress starts)."""
        reader = ThreadPoolExecutor(self.read_workers, thread_name_prefix="slide-read")
        writer = ThreadPoolExecutor(1, thread_name_prefix="slide-write")
        #: Runs the model, so that the job can stop waiting for it (``_wait``).
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="slide-model")
        writes: deque[Future] = deque()
        blender: RowBlender | None = None
        band_of_blender = None
        pending: list[tuple[_Window, np.ndarray | None]] = []
        try:
            for window, pixels in self._read_ahead(reader, windows):
                pending.append((window, pixels))
                ready = sum(p is not None for _, p in pending)
                if ready < self.batch_size and window is not windows[-1]:
                    continue
                images = [p for _, p in pending if p is not None]
                predictions = (yield from self._predict(np.stack(images))) if images else []
                if predictions is None:
                    return False  # stopped inside the batch: its rows are done on resume
                if images and self.spec.white_plane:
                    predictions = np.concatenate([predictions, self._white(images)], axis=1)
                outputs = iter(predictions)
                for item, item_pixels in pending:
                    if band_of_blender != item.band:
                        blender = self._new_blender(item.band)
                        band_of_blender = item.band
                    if item_pixels is not None:
                        blender.add(item.row, item.col, next(outputs))
                    if item.ends_row:
                        values, covered = blender.finish_row(item.row)
                        if not item.primes:
                            yield from self._queue_write(writer, writes, root, item, values,
                                                         covered)
                pending = []
                for _ in images:
                    yield Batch(STAGE, epoch=0, index=min(done_tiles, total - 1), total=total)
                    done_tiles += 1
                if self._stop_requested():
                    return False
            return True
        finally:
            self.model_thread.shutdown(wait=False, cancel_futures=True)
            reader.shutdown(wait=True, cancel_futures=True)
            try:
                for future in writes:
                    future.result()
            finally:
                writer.shutdown(wait=True)

    # ------------------------------------------------------------------ steps

    def _map_channels(self) -> dict[str, list[str]]:
        """Channel names of each per-class map, from one probe prediction on a blank tile."""
        blank = np.full((1, self.grid.tile, self.grid.tile, 3), 255, np.uint8)
        with _predictor_lock(self.predictor):  # after a stopped job's batch, if one is left
            channels = np.asarray(self.predictor.predict_batch(blank)).shape[1]
            cams = np.asarray(self.predictor.predict_cams(blank)).shape[1] \
                if self.write_cams else 0
        maps = {store.PROBABILITIES_PATH: _channel_names(self.spec, channels)}
        if self.write_cams:
            maps[store.CAMS_PATH] = _channel_names(self.spec, cams)
        return maps

    def _plan(self, root, mask: TissueMask | None) -> list[_Window]:
        """Windows in processing order: band by band, rows top to bottom, done rows left out."""
        done = np.asarray(root[store.DONE_PATH][:], dtype=bool)
        first_rows = []
        for col_start, col_stop in self.bands:
            not_done = ~done[:, col_start:col_stop].all(axis=1)
            first_rows.append(int(np.argmax(not_done)) if not_done.any() else None)
        return self._windows(first_rows, mask)

    def _tissue_tiles(self, mask: TissueMask | None) -> int:
        """Tiles a run from scratch predicts (the length of the progress bar)."""
        return sum(w.has_tissue for w in self._windows([0] * len(self.bands), mask))

    def _windows(self, first_rows: list[int | None], mask: TissueMask | None) -> list[_Window]:
        """The windows of each band from its first row not done (None: band done)."""
        grid, scale = self.grid, self.resolution.level0_downsample
        windows = []
        for band, (col_start, col_stop) in enumerate(self.bands):
            first_row = first_rows[band]
            if first_row is None:
                continue
            for row in range(max(first_row - 1, 0), grid.rows):
                window_cols = range(max(col_start - 1, 0), col_stop)
                for col in window_cols:
                    y, x = grid.origin(row, col)
                    has_tissue = mask is None or mask.any_tissue(
                        y * scale, x * scale, (y + grid.tile) * scale, (x + grid.tile) * scale
                    )
                    windows.append(_Window(
                        band=band, row=row, col=col, has_tissue=has_tissue,
                        ends_row=col == window_cols[-1], primes=row < first_row,
                    ))
        return windows

    def _bands(self) -> list[tuple[int, int]]:
        """Block-column ranges whose blending buffers fit the memory budget."""
        channels = sum(len(names) for names in self.maps.values()) + self.spec.white_plane + 1
        bytes_per_col = channels * self.grid.tile * self.grid.stride * 4
        cols_per_band = max(1, self.band_budget_bytes // bytes_per_col - 1)
        return [
            (start, min(start + cols_per_band, self.grid.cols))
            for start in range(0, self.grid.cols, cols_per_band)
        ]

    def _new_blender(self, band: int) -> RowBlender:
        channels = sum(len(names) for names in self.maps.values()) + self.spec.white_plane
        col_start, col_stop = self.bands[band]
        return RowBlender(self.grid, channels, self.blend, col_start, col_stop)

    def _read_ahead(self, pool, windows: Sequence[_Window]) -> Iterator[tuple]:
        """``(window, pixels or None)`` in order, with reads running ahead in ``pool``."""
        depth = READ_AHEAD_BATCHES * self.batch_size
        in_flight: deque[tuple[_Window, Future | None]] = deque()
        upcoming = iter(windows)
        for window in upcoming:
            in_flight.append((window, pool.submit(self._read, window) if window.has_tissue
                              else None))
            if sum(f is not None for _, f in in_flight) >= depth:
                break
        while in_flight:
            window, future = in_flight.popleft()
            next_window = next(upcoming, None)
            if next_window is not None:
                in_flight.append((next_window, pool.submit(self._read, next_window)
                                  if next_window.has_tissue else None))
            yield window, None if future is None else future.result()

    def _read(self, window: _Window) -> np.ndarray:
        """Window pixels at the working resolution (read at the level, then resized)."""
        y, x = self.grid.origin(window.row, window.col)
        factor, tile = self.resolution.factor, self.grid.tile
        if factor == 1.0:
            return read_region(self.slide, self.resolution.level, y, x, tile, tile)
        size = max(1, round(tile * factor))
        pixels = read_region(self.slide, self.resolution.level, round(y * factor),
                             round(x * factor), size, size)
        from PIL import Image

        return np.asarray(Image.fromarray(pixels).resize((tile, tile), Image.Resampling.BILINEAR))

    def _predict(self, images: np.ndarray) -> Generator[Event, None, np.ndarray | None]:
        """Predictions for ``images`` in sub-batches, run in the model thread; halves the batch
        on out-of-memory; None when a stop request came while the model ran."""
        outputs, start = [], 0
        while start < len(images):
            part = images[start : start + self.batch_size]
            try:
                maps = self._wait(self.model_thread.submit(self._maps, part))
            except Exception as error:
                from ..devices import is_out_of_memory

                if not is_out_of_memory(error):
                    raise
                if self.batch_size == 1:
                    raise HistoWsssError(
                        "out of device memory even with batch size 1; use a smaller tile or "
                        "another device") from None
                self.batch_size = max(1, self.batch_size // 2)
                _release_device_memory()
                yield Message(STAGE, f"out of device memory: batch size lowered to "
                                     f"{self.batch_size}")
                continue
            if maps is None:
                return None
            outputs.append(maps)
            start += len(part)
        return np.concatenate(outputs)

    def _maps(self, part: np.ndarray) -> np.ndarray:
        """The model's maps of ``part`` (in the model thread, one call per predictor at once)."""
        with _predictor_lock(self.predictor):
            maps = [np.asarray(self.predictor.predict_batch(part), np.float32)]
            if self.write_cams:
                maps.append(np.asarray(self.predictor.predict_cams(part), np.float32))
        return np.concatenate(maps, axis=1)

    def _wait(self, call: Future) -> np.ndarray | None:
        """The call's result, or None as soon as a stop is requested (the call is left to
        finish in the model thread; its result is dropped)."""
        while True:
            try:
                return call.result(timeout=STOP_POLL_SECONDS)
            except TimeoutError:
                if self._stop_requested():
                    return None

    def _white(self, images: list[np.ndarray]) -> np.ndarray:
        """``(N, 1, h, w)`` 1.0 where a pixel is glass by the dataset's white-plane rule."""
        grey = np.stack(images).mean(axis=-1, dtype=np.float32)
        return (grey > self.spec.white_threshold).astype(np.float32)[:, None]

    def _queue_write(self, writer, writes, root, window, values, covered):
        """Send a finished row of blocks to the writer thread; show it as a preview."""
        probabilities = values[: len(self.maps[store.PROBABILITIES_PATH])]
        labels = labels_from_probabilities(probabilities, covered, self.spec)
        if self.spec.white_plane:
            labels[values[-1] > 0.5] = 0
            values = values[:-1]
        y0, y1, _, _ = self.grid.block(window.row, 0)
        col_start, col_stop = self.bands[window.band]
        x0 = self.grid.block(0, col_start)[2]
        np.clip(values, 0.0, 1.0, out=values)  # in place: these rows are band-wide
        values *= 255
        scaled = np.rint(values, out=values).astype(np.uint8)
        while len(writes) >= WRITE_QUEUE:
            writes.popleft().result()
        writes.append(writer.submit(
            _write_row, root, self.maps, (y0, y1, x0), labels, scaled, window.row,
            (col_start, col_stop),
        ))
        if covered.any():
            yield Preview(STAGE, "labels", {
                "y": y0, "x": x0, "labels": labels,
                "level0_downsample": self.resolution.level0_downsample,
            })


def labels_from_probabilities(
    probabilities: np.ndarray, covered: np.ndarray, spec: DatasetSpec
) -> np.ndarray:
    """Stored label values: class index + 1, 0 where uncovered or a background channel wins."""
    best = probabilities.argmax(axis=0)
    labels = (best + 1).astype(np.uint8)
    labels[best >= spec.num_classes] = 0
    labels[~covered] = 0
    return labels


def _write_row(root, maps, origin, labels, scaled, row, cols) -> None:
    """Write one finished row of blocks, then mark it done (in that order, for resume)."""
    y0, y1, x0 = origin
    x1 = x0 + labels.shape[1]
    root[store.LABELS_PATH]["0"][y0:y1, x0:x1] = labels
    offset = 0
    for name, names in maps.items():
        root[name]["0"][:, y0:y1, x0:x1] = scaled[offset : offset + len(names)]
        offset += len(names)
    root[store.DONE_PATH][row, cols[0] : cols[1]] = 1


def _channel_names(spec: DatasetSpec, channels: int) -> list[str]:
    names = list(spec.all_names)
    if channels <= len(names):
        return names[:channels]
    return names + [f"channel {index}" for index in range(len(names), channels)]


def _changed_keys(old: dict, new: dict) -> list[str]:
    return sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))


def _describe_mpp(mpp: float | None) -> str:
    return "mpp unknown" if mpp is None else f"{mpp:.3g} um/px"


def _release_device_memory() -> None:
    import torch

    from ..devices import release_memory

    release_memory(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


# ---------------------------------------------------------------------- cohorts


def segment_slides(
    predictor: Predictor | Callable[[], Predictor],
    slides: Sequence[str | Path],
    out: str | Path | Sequence[str | Path],
    *,
    scheduler: str | Any | None = None,
    stop: StopToken | None = None,
    **options: Any,
) -> Generator[Event, None, None]:
    """Segment several slides; Done carries a :class:`CohortResult`.

    ``out`` is a folder (outputs ``<slide name>.zarr`` in it) or one output path per slide.

    Without ``scheduler`` the slides run here one after another. With a dask.distributed
    scheduler address (or a ``Client``), each slide is one task and each worker builds the
    model once: ``predictor`` must then be a picklable zero-argument factory, for example
    ``functools.partial(load_predictor, run_dir, device)``, and the workers must see the
    slide and output paths. A slide that fails is reported and the others go on.
    """
    targets = _output_paths(slides, out)
    if scheduler is not None:
        yield from _segment_on_cluster(predictor, targets, scheduler, stop, options)
        return
    if not hasattr(predictor, "predict_batch"):
        predictor = predictor()
    result = CohortResult()
    for index, (slide_path, out_path) in enumerate(targets):
        yield Message(STAGE, f"slide {index + 1}/{len(targets)}: {slide_path}")
        try:
            for event in segment_slide(predictor, slide_path, out_path, stop=stop, **options):
                if isinstance(event, Done):
                    if event.stopped:
                        yield Done(STAGE, result, stopped=True)
                        return
                    result.outputs.append(Path(event.result))
                else:
                    yield event
        except SlideError as error:
            result.failures[str(slide_path)] = str(error)
            yield Message(STAGE, f"skipped: {error}")
    yield Done(STAGE, result)


def _output_paths(slides, out) -> list[tuple[Path, Path]]:
    slides = [Path(slide) for slide in slides]
    if not isinstance(out, str | Path):
        if len(out) != len(slides):
            raise ConfigError(f"{len(slides)} slides but {len(out)} output paths")
        return list(zip(slides, map(Path, out), strict=True))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets, seen = [], set()
    for slide_path in slides:
        name = slide_name(slide_path)
        if name in seen:
            raise ConfigError(f"two slides are named '{name}'; give them distinct names")
        seen.add(name)
        targets.append((slide_path, out_dir / f"{name}.zarr"))
    return targets


def _segment_on_cluster(factory, targets, scheduler, stop, options):
    from distributed import Client, as_completed

    client = scheduler if isinstance(scheduler, Client) else Client(scheduler)
    try:
        futures = {
            client.submit(_segment_on_worker, factory, str(slide_path), str(out_path), options,
                          pure=False): slide_path
            for slide_path, out_path in targets
        }
        yield Message(STAGE, f"{len(futures)} slides sent to {client.scheduler.address}")
        yield Started(STAGE, total_epochs=1, batches_per_epoch=len(futures))
        result = CohortResult()
        for finished, future in enumerate(as_completed(futures), start=1):
            slide_path = futures[future]
            try:
                result.outputs.append(Path(future.result()))
                yield Message(STAGE, f"done: {slide_path}")
            except HistoWsssError as error:
                result.failures[str(slide_path)] = str(error)
                yield Message(STAGE, f"skipped: {error}")
            yield Batch(STAGE, epoch=0, index=finished - 1, total=len(futures))
            if stop is not None and stop.requested:
                client.cancel(list(futures))
                yield Done(STAGE, result, stopped=True)
                return
        yield Done(STAGE, result)
    finally:
        if client is not scheduler:
            client.close()


_WORKER_PREDICTORS: dict[tuple[str, str], Any] = {}
_WORKER_LOCK = threading.Lock()


def _segment_on_worker(factory, slide_path: str, out_path: str, options: dict) -> str:
    """Runs on a dask worker: one model per worker, built on first use and kept."""
    from dask.base import tokenize
    from distributed import get_worker

    key = (get_worker().address, tokenize(factory))
    with _WORKER_LOCK:
        if key not in _WORKER_PREDICTORS:
            _WORKER_PREDICTORS[key] = factory()
        predictor = _WORKER_PREDICTORS[key]
    return str(run_to_completion(segment_slide(predictor, slide_path, out_path, **options)))

