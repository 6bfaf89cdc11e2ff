"""A pyramidal TIFF slide phantom with tissue and tumour regions, and its ASAP XML (datamodules.slides).

The slide: white glass, pink tissue blobs, darker purple tumour blobs inside the tissue, JPEG tiles, levels as
successive reduced-resolution pages (the generic tiled TIFF that both tifffile and OpenSlide read as a pyramid).
The XML: one tumour polygon per tumour blob (group ``Tumor``) and an exclusion hole (``Exclusion``) in the first.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.phantoms.common import ellipsoid, smooth_noise

TEST_SIZE = {"patch_size": [32, 32], "batch_size": 4, "data.init_args.stride": 32,
             "data.init_args.val_slides": "[tumor_002,normal_002]"}
GLASS, TISSUE, TUMOUR = (np.array(c) for c in ((0.96, 0.96, 0.97), (0.90, 0.62, 0.78), (0.50, 0.28, 0.58)))


def write_pyramid(path, rgb: np.ndarray, levels: int = 3, tile: int = 128) -> Path:
    """RGB uint8 [H, W, 3] as a tiled JPEG TIFF with ``levels`` levels (each half the previous, 2x2 means)."""
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tiff:
        image = rgb
        for level in range(levels):
            tiff.write(image, tile=(tile, tile), compression="jpeg", photometric="rgb",
                       subfiletype=0 if level == 0 else 1)
            h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
            image = image[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3)).round().astype(np.uint8)
    return path


def polygon_of(centre, axes, n: int = 24) -> np.ndarray:
    """An ellipse outline [n, 2] of (x, y) level-0 points."""
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([centre[0] + axes[0] * np.cos(angles), centre[1] + axes[1] * np.sin(angles)], 1)


def asap_xml(tumours: list[np.ndarray], exclusions: list[np.ndarray]) -> str:
    """ASAP_Annotations XML text for tumour and exclusion polygons."""
    parts = ['<?xml version="1.0"?>', "<ASAP_Annotations>", "<Annotations>"]
    for i, (group, polygon) in enumerate([("Tumor", p) for p in tumours] + [("Exclusion", p) for p in exclusions]):
        parts.append(f'<Annotation Name="Annotation {i}" Type="Polygon" PartOfGroup="{group}" Color="#F4FA58">')
        parts.append("<Coordinates>")
        parts += [f'<Coordinate Order="{k}" X="{x:.2f}" Y="{y:.2f}" />' for k, (x, y) in enumerate(polygon)]
        parts += ["</Coordinates>", "</Annotation>"]
    parts += ["</Annotations>", "<AnnotationGroups>", '<Group Name="Tumor" PartOfGroup="None" Color="#00ff00" />',
              '<Group Name="Exclusion" PartOfGroup="None" Color="#ff0000" />', "</AnnotationGroups>",
              "</ASAP_Annotations>"]
    return "\n".join(parts)


def make_slide(path, rng: np.random.Generator, size: tuple[int, int] = (512, 768), n_tumours: int = 1,
               levels: int = 3) -> tuple[Path, str]:
    """Write one slide phantom; returns (its path, the ASAP XML text of its tumours; no polygon when
    ``n_tumours`` is 0)."""
    h, w = size
    coords = np.stack(np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32), indexing="xy"))
    tissue = ellipsoid(coords, (0.5 * w, 0.5 * h), (0.38 * w, 0.36 * h), rng.uniform(0, 0.5))
    colour = np.where(tissue[..., None], TISSUE, GLASS)
    tumours, exclusions = [], []
    for _ in range(n_tumours):
        centre = (rng.uniform(0.35, 0.65) * w, rng.uniform(0.35, 0.65) * h)
        axes = (rng.uniform(0.08, 0.14) * w, rng.uniform(0.08, 0.14) * h)
        polygon = polygon_of(centre, axes)
        inside = ((coords[0] - centre[0]) / axes[0]) ** 2 + ((coords[1] - centre[1]) / axes[1]) ** 2 <= 1
        colour = np.where(inside[..., None], TUMOUR, colour)
        tumours.append(polygon)
    if tumours:
        centre = tumours[0].mean(0)
        exclusions.append(polygon_of(centre, (0.02 * w, 0.02 * h), 12))
    texture = 0.04 * np.stack([smooth_noise(rng, (h, w), 2.0) for _ in range(3)], -1)
    rgb = (255 * np.clip(colour + texture, 0, 1)).astype(np.uint8)
    return write_pyramid(path, rgb, levels), asap_xml(tumours, exclusions)


def make_camelyon16(root, n_normal: int = 2, n_tumor: int = 2, n_test: int = 2, size: tuple[int, int] = (512, 768),
                    seed: int = 0) -> Path:
    """The official Camelyon16 layout with phantom slides: training/{normal,tumor}, lesion XMLs of the tumour
    slides, testing/images (odd test ids tumour, even normal), their XMLs and reference.csv."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    slides = ([("training/normal", f"normal_{i:03d}", 0) for i in range(1, n_normal + 1)]
              + [("training/tumor", f"tumor_{i:03d}", 1) for i in range(1, n_tumor + 1)]
              + [("testing/images", f"test_{i:03d}", i % 2) for i in range(1, n_test + 1)])
    reference = []
    for folder, name, tumour in slides:
        _, xml = make_slide(root / folder / f"{name}.tif", rng, size, n_tumours=tumour)
        if tumour:
            annotations = root / folder.split("/")[0] / "lesion_annotations"
            annotations.mkdir(parents=True, exist_ok=True)
            (annotations / f"{name}.xml").write_text(xml)
        if folder.startswith("testing"):
            reference.append(f"{name},{'Tumor' if tumour else 'Normal'}" + (",Macro" if tumour else ""))
    if reference:
        (root / "testing" / "reference.csv").write_text("\n".join(reference) + "\n")
    return root
