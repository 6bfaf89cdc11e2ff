"""The image model every phantom shares: smooth noise, bias fields, acquisition blur and noise, shapes."""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma) -> np.ndarray:
    """Gaussian-filtered white noise of ``shape`` with unit standard deviation (float32)."""
    field = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    return field / (field.std() + 1e-12)


def bias_field(rng: np.random.Generator, shape: tuple[int, ...], cycles, strength: float = 0.25) -> np.ndarray:
    """Smooth multiplicative field of ``shape`` (float32, geometric mean about 1): exp of a sum of three
    separable cosine products with at most ``cycles`` (one per axis) periods across the field of view."""
    grids = np.ix_(*(np.linspace(0, 2 * np.pi, n, dtype=np.float32) for n in shape))
    field = sum(math.prod([np.cos(rng.uniform(0, c) * g + rng.uniform(0, 2 * np.pi)) for g, c in zip(grids, cycles)])
                for _ in range(3))
    return np.exp(strength * field / (field.std() + 1e-12))


def acquire(rng: np.random.Generator, image: np.ndarray, blur, cycles, noise: float) -> np.ndarray:
    """Scanner effects on an ideal intensity map (any shape): partial volume blur, a random gamma, a bias
    field and Rician noise of std ``noise`` x the mean (magnitude images keep a positive noise floor)."""
    image = np.clip(ndi.gaussian_filter(image, blur), 1e-3, None) ** rng.uniform(0.8, 1.25)
    image = image * bias_field(rng, image.shape, cycles)
    scale = noise * image.mean()
    real = image + scale * rng.standard_normal(image.shape, dtype=np.float32)
    return np.hypot(real, scale * rng.standard_normal(image.shape, dtype=np.float32))


def ellipsoid(coords: np.ndarray, centre, axes, angle: float = 0.0) -> np.ndarray:
    """Mask of an ellipsoid on the grid ``coords`` (n, *S), rotated by ``angle`` in the first two axes."""
    d = [c - float(m) for c, m in zip(coords, centre)]
    cos, sin = float(np.cos(angle)), float(np.sin(angle))
    d[0], d[1] = cos * d[0] + sin * d[1], -sin * d[0] + cos * d[1]
    return sum((di / float(a)) ** 2 for di, a in zip(d, axes)) <= 1.0


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a boolean mask (any ndim); all False if the mask is empty."""
    components, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(components.ravel())[1:]
    return components == 1 + int(np.argmax(sizes))
