"""Per-image appearance refinement: class boundaries moved onto the image's own stain edges.

A segmenter trained on CAM pseudo-masks draws regions as blobs: on WSSS4LUAD val the largest
error is the thin stroma between tumour glands called tumour (docs/results.md). Within one
image the classes differ in stain and texture (stroma: eosin-rich fibres; tumour: dense
haematoxylin nuclei), so each image gets its own small model of how its classes look: a
multinomial logistic regression on smoothed HED colour and local contrast, fitted to the
pixels the network is confident about, whose log-probabilities are added to the network's
(``log p + weight * log q``). A class-conditional colour model like GrabCut's, learnt per
image, so no stain normalisation is needed. docs/algorithms.md 15.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

#: Smoothing scales (pixels) of the colour and contrast features.
SIGMAS = (1, 2, 4, 8)
#: Network probability above which a pixel teaches the appearance model its class.
CONFIDENT = 0.6
#: A class is modelled where at least this share of the image's pixels are confidently its.
MIN_CLASS_SHARE = 0.01
#: Teaching pixels per image, at most (an even random sample beyond it).
MAX_SAMPLES = 5_000
#: L2 penalty on the regression weights (features are standardised per image).
WEIGHT_DECAY = 1e-3
#: Weight of the appearance model at least, on an image with a user's strokes (they are
#: evidence the network's own confident pixels are not).
STROKE_WEIGHT = 1.0
#: Share of the regression's sample weight carried by the strokes.
STROKE_SHARE = 0.5
#: A stroke's reach, in a predicted region it contradicts, per pixel of the stroke's own extent
#: (its bounding box's diagonal): the pixels that near are decided by the appearance model
#: alone. A long stroke says a large region is wrong, a dab a small one; reaching as far as
#: the stroke is long gained over the best fixed reach (32 px) at 1, 3 and 10 strokes per
#: image on both halves of val (docs/results.md).
STROKE_REACH = 1.0
#: The least and the most a stroke reaches (px), whatever its extent.
STROKE_REACH_LIMITS = (16.0, 128.0)


def appearance_features(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H * W, F) float32: the haematoxylin, eosin and DAB optical
    densities smoothed at each of ``SIGMAS`` and the local standard deviation of the first two
    (texture: nuclei are dense dots, fibres are smooth), standardised over the image."""
    from skimage.color import rgb2hed

    hed = rgb2hed(image).astype(np.float32)
    channels = []
    for sigma in SIGMAS:
        smooth = [ndi.gaussian_filter(hed[..., c], sigma) for c in range(3)]
        channels.extend(smooth)
        if sigma >= 2:
            for c in range(2):
                square = ndi.gaussian_filter(hed[..., c] ** 2, sigma)
                channels.append(np.sqrt(np.maximum(square - smooth[c] ** 2, 0)))
    planes = np.stack(channels).reshape(len(channels), -1)  # one contiguous row per feature
    mean, std = planes.mean(axis=1, keepdims=True), planes.std(axis=1, keepdims=True)
    return ((planes - mean) / (std + 1e-6)).T


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (P, K) logits, stable for any scale."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def balanced_weights(labels: np.ndarray, classes: int, total: float = 1.0) -> np.ndarray:
    """Per-sample weights summing to ``total`` with every class present counting equally."""
    counts = np.bincount(labels, minlength=classes).astype(np.float64)
    present = np.count_nonzero(counts)
    return total / (present * counts[labels])


def fit_logistic(features: np.ndarray, labels: np.ndarray, classes: int,
                 sample_weight: np.ndarray | None = None) -> np.ndarray:
    """Weights ((F + 1), K) of a weighted multinomial logistic regression (L-BFGS); by default
    class-balanced, so a small region still shapes the boundary."""
    from scipy.optimize import minimize

    x = np.concatenate([features, np.ones((len(features), 1), features.dtype)], axis=1)
    x = x.astype(np.float64)
    target = np.eye(classes)[labels]
    if sample_weight is None:
        sample_weight = balanced_weights(labels, classes)

    def loss_and_gradient(flat: np.ndarray) -> tuple[float, np.ndarray]:
        weights = flat.reshape(x.shape[1], classes)
        log_q = log_softmax(x @ weights)
        penalty = WEIGHT_DECAY * (weights[:-1] ** 2).sum()
        loss = -(sample_weight * (target * log_q).sum(axis=1)).sum() + penalty
        gradient = x.T @ (sample_weight[:, None] * (np.exp(log_q) - target))
        gradient[:-1] += 2 * WEIGHT_DECAY * weights[:-1]
        return loss, gradient.ravel()

    start = np.zeros(x.shape[1] * classes)
    result = minimize(loss_and_gradient, start, jac=True, method="L-BFGS-B",
                      options={"maxiter": 100})
    return result.x.reshape(x.shape[1], classes)


def refine_by_appearance(probabilities: np.ndarray, image: np.ndarray, weight: float,
                         white_threshold: int = 255, painted: np.ndarray | None = None,
                         stroke_share: float = STROKE_SHARE,
                         stroke_reach: float = STROKE_REACH) -> np.ndarray:
    """(C, H, W) class probabilities of ``image`` (H, W, 3) uint8 -> refined probabilities.

    The classes with at least ``MIN_CLASS_SHARE`` of confident pixels are modelled, from a
    sample of those pixels (white glass, every channel above ``white_threshold``, teaches
    nothing); their log-probabilities gain ``weight`` times the appearance model's, the other
    classes' the least of those (the model does not know them, so it lifts none of them over a
    modelled class). An image with fewer than two such classes is returned as it is.

    ``painted`` (H, W) are a user's strokes on this image (0 = not painted, k = class k - 1,
    as ``core.corrections.store`` keeps them). In a predicted region that a stroke of another
    class touches, the pixels within ``stroke_reach`` times the stroke's extent (within
    ``STROKE_REACH_LIMITS``) are overruled: they teach nothing and the appearance model alone
    decides them (docs/results.md: a fixed wide reach gained with one stroke per image and
    lost with ten). The painted pixels teach their class with ``stroke_share`` of the
    regression's weight, every painted class is modelled, and they take their painted class.
    """
    strokes = _stroke_classes(painted, probabilities.shape)
    classes, height, width = probabilities.shape
    flat = probabilities.reshape(classes, -1)
    if weight <= 0:
        return probabilities if strokes is None else _with_strokes(flat, strokes, probabilities)
    best, confidence = flat.argmax(axis=0), flat.max(axis=0)
    teaching = (confidence > CONFIDENT) & (image.reshape(-1, 3).min(axis=1) <= white_threshold)
    overruled = np.zeros_like(teaching)
    if strokes is not None:
        overruled = _overruled(best.reshape(height, width), strokes, stroke_reach)
        teaching &= ~overruled & (strokes < 0)
    counts = np.bincount(best[teaching], minlength=classes)
    modelled = np.flatnonzero(counts >= MIN_CLASS_SHARE * height * width)
    if strokes is not None:
        modelled = np.union1d(modelled, strokes[strokes >= 0])
    if len(modelled) < 2:
        return probabilities if strokes is None else _with_strokes(flat, strokes, probabilities)
    teaching &= np.isin(best, modelled)
    features = appearance_features(image)
    log_q = _appearance_log_probabilities(features, best, teaching, strokes, modelled,
                                          stroke_share)
    scores = np.log(np.clip(flat, 1e-8, None))
    scores[:, overruled] = 0.0  # the network's vote dropped where a stroke contradicts it
    scores[modelled] += weight * log_q.T
    others = np.setdiff1d(np.arange(classes), modelled)
    scores[others] += weight * log_q.min(axis=1)  # unvouched for: never a gain over the rest
    refined = np.exp(log_softmax(scores.T)).T
    if strokes is not None:
        return _with_strokes(refined, strokes, probabilities)
    return refined.reshape(classes, height, width).astype(np.float32)


def _appearance_log_probabilities(features: np.ndarray, best: np.ndarray,
                                  teaching: np.ndarray, strokes: np.ndarray | None,
                                  modelled: np.ndarray, stroke_share: float) -> np.ndarray:
    """(H * W, len(modelled)) log q of the regression fitted to a sample of the ``teaching``
    pixels (labelled by the network's ``best`` class) and of the strokes, if any."""
    position = np.full(int(modelled.max()) + 1, -1)
    position[modelled] = np.arange(len(modelled))
    sample = _at_most(np.flatnonzero(teaching), MAX_SAMPLES)
    labels = position[best[sample]]
    sample_weight = balanced_weights(labels, len(modelled)) if len(sample) else np.empty(0)
    if strokes is not None:
        stroke_sample = _at_most(np.flatnonzero(strokes >= 0), MAX_SAMPLES)
        stroke_labels = position[strokes[stroke_sample]]
        share = stroke_share if len(sample) else 1.0
        sample_weight = np.concatenate([
            (1 - share) * sample_weight,
            balanced_weights(stroke_labels, len(modelled), share)])
        sample, labels = (np.concatenate([sample, stroke_sample]),
                          np.concatenate([labels, stroke_labels]))
    weights = fit_logistic(features[sample], labels, len(modelled), sample_weight)
    return log_softmax(features @ weights[:-1] + weights[-1])


def _overruled(best: np.ndarray, strokes: np.ndarray, reach: float) -> np.ndarray:
    """Flat mask of the pixels near a stroke, in the connected region of one predicted class
    that the stroke (of another class) touches: there the user has said the network is wrong.
    Each connected piece of contradicting stroke reaches ``reach`` times its extent."""
    overruled = np.zeros(best.size, bool)
    flat_best = best.reshape(-1)
    contradicted = (strokes >= 0) & (flat_best != strokes)
    if not contradicted.any():
        return overruled
    near = _near_strokes(contradicted.reshape(best.shape), reach).reshape(-1)
    for predicted in np.unique(flat_best[contradicted]):
        regions, _ = ndi.label(best == predicted)
        touched = np.unique(regions.reshape(-1)[contradicted & (flat_best == predicted)])
        overruled |= np.isin(regions.reshape(-1), touched[touched > 0])
    return overruled & near


def _near_strokes(contradicted: np.ndarray, reach: float) -> np.ndarray:
    """(H, W) pixels within each stroke piece's own reach: ``reach`` times the diagonal of its
    bounding box, kept within ``STROKE_REACH_LIMITS``."""
    pieces, _ = ndi.label(contradicted, structure=np.ones((3, 3)))
    low, high = STROKE_REACH_LIMITS
    near = np.zeros(contradicted.shape, bool)
    for index, box in enumerate(ndi.find_objects(pieces), start=1):
        extent = float(np.hypot(box[0].stop - box[0].start, box[1].stop - box[1].start))
        piece_reach = min(max(reach * extent, low), high)
        pad = int(np.ceil(piece_reach))  # beyond the padded box every pixel is farther
        window = tuple(slice(max(side.start - pad, 0), side.stop + pad) for side in box)
        near[window] |= ndi.distance_transform_edt(pieces[window] != index) <= piece_reach
    return near


def _stroke_classes(painted: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """Flat class index per pixel of the painted tissue classes (-1 elsewhere), or None when
    nothing is painted. Painted glass (the value after the last class) counts as unpainted:
    the probabilities have no plane for it."""
    if painted is None:
        return None
    classes, height, width = shape
    if painted.shape != (height, width):
        raise ValueError(f"strokes of shape {painted.shape} for an image of {(height, width)}")
    strokes = painted.reshape(-1).astype(np.int64) - 1
    strokes[strokes >= classes] = -1
    return strokes if (strokes >= 0).any() else None


def _with_strokes(flat: np.ndarray, strokes: np.ndarray, like: np.ndarray) -> np.ndarray:
    """(C, H * W) probabilities with the painted pixels set to their painted class."""
    flat = flat.astype(np.float32, copy=True)
    painted = np.flatnonzero(strokes >= 0)
    flat[:, painted] = 0.0
    flat[strokes[painted], painted] = 1.0
    return flat.reshape(like.shape)


def _at_most(indices: np.ndarray, limit: int) -> np.ndarray:
    """An even, seeded random sample of at most ``limit`` of ``indices`` (kept in order)."""
    if len(indices) <= limit:
        return indices
    return np.sort(np.random.default_rng(0).choice(indices, limit, replace=False))
