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


def fit_logistic(features: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """Weights ((F + 1), K) of a class-balanced multinomial logistic regression (L-BFGS):
    each class counts equally, so a small region still shapes the boundary."""
    from scipy.optimize import minimize

    x = np.concatenate([features, np.ones((len(features), 1), features.dtype)], axis=1)
    x = x.astype(np.float64)
    target = np.eye(classes)[labels]
    counts = np.bincount(labels, minlength=classes).astype(np.float64)
    sample_weight = (len(labels) / (classes * counts))[labels] / len(labels)

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
                         white_threshold: int = 255) -> np.ndarray:
    """(C, H, W) class probabilities of ``image`` (H, W, 3) uint8 -> refined probabilities.

    The classes with at least ``MIN_CLASS_SHARE`` of confident pixels are modelled, from a
    sample of those pixels (white glass, every channel above ``white_threshold``, teaches
    nothing); their log-probabilities gain ``weight`` times the appearance model's, the other
    classes' the least of those (the model does not know them, so it lifts none of them over a
    modelled class). An image with fewer than two such classes is returned as it is.
    """
    if weight <= 0:
        return probabilities
    classes, height, width = probabilities.shape
    flat = probabilities.reshape(classes, -1)
    best, confidence = flat.argmax(axis=0), flat.max(axis=0)
    teaching = (confidence > CONFIDENT) & (image.reshape(-1, 3).min(axis=1) <= white_threshold)
    counts = np.bincount(best[teaching], minlength=classes)
    modelled = np.flatnonzero(counts >= MIN_CLASS_SHARE * height * width)
    if len(modelled) < 2:
        return probabilities
    teaching &= np.isin(best, modelled)
    sample = np.flatnonzero(teaching)
    if len(sample) > MAX_SAMPLES:
        sample = np.sort(np.random.default_rng(0).choice(sample, MAX_SAMPLES, replace=False))
    features = appearance_features(image)
    position = np.full(classes, -1)
    position[modelled] = np.arange(len(modelled))
    weights = fit_logistic(features[sample], position[best[sample]], len(modelled))
    log_q = log_softmax(features @ weights[:-1] + weights[-1])
    scores = np.log(np.clip(flat, 1e-8, None))
    scores[modelled] += weight * log_q.T
    others = np.setdiff1d(np.arange(classes), modelled)
    scores[others] += weight * log_q.min(axis=1)  # unvouched for: never a gain over the rest
    refined = np.exp(log_softmax(scores.T)).T
    return refined.reshape(classes, height, width).astype(np.float32)
