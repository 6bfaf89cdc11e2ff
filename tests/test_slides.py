"""Slides by region (tifffile + zarr and OpenSlide give the same pixels; virtual levels), ASAP XML and its
rasterisation with exclusion holes (spec/methods/ikd_mil.md sec. 12), tissue detection."""
from __future__ import annotations

import numpy as np
import pytest

from datamodules.phantoms.slides import make_slide, polygon_of
from datamodules.slides import Slide, rasterise, read_asap, tissue_mask
from lemis.errors import DataError
from tests.conftest import real

REGIONS = [(0, (100, 40), (200, 150)), (1, (64, 32), (100, 90)), (2, (0, 0), (192, 128)),
           (1, (700, 480), (64, 64)),  # crosses the border: zeros outside, as OpenSlide
           (3, (0, 0), (96, 64))]  # a virtual level


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory):
    path, xml = make_slide(tmp_path_factory.mktemp("slide") / "tumor_001.tif", np.random.default_rng(0))
    (path.parent / "tumor_001.xml").write_text(xml)
    return path


def test_both_readers_give_the_same_pixels_at_every_level(slide_file):
    a, b = Slide(slide_file, "tifffile"), Slide(slide_file, "openslide")
    assert a.dimensions == b.dimensions == [(768, 512), (384, 256), (192, 128), (96, 64)]
    assert a.real_levels == b.real_levels == 3 and a.downsamples[-1] == 8.0
    for level, location, size in REGIONS:
        x, y = a.read_region(location, level, size), b.read_region(location, level, size)
        assert x.shape == (size[1], size[0], 3) and np.array_equal(x, y), (level, location)
    edge = a.read_region((700, 480), 1, (64, 64))
    assert not edge[40:].any() and edge[:10, :10].any()  # rows past the slide's bottom are 0
    assert a.best_level(32) == 3 and a.best_level(1.4) == 0


def test_virtual_level_is_the_block_mean_of_level_0(slide_file):
    s = Slide(slide_file)
    full = s.read_region((0, 0), 0, (768, 512)).astype(np.float64)
    expected = np.round(full.reshape(64, 8, 96, 8, 3).mean((1, 3))).astype(np.uint8)
    assert np.array_equal(s.thumbnail(3), expected)


def test_asap_rasterisation_with_an_exclusion_hole(tmp_path):
    tumour = np.array([[2, 2], [6, 2], [6, 6], [2, 6]], float)
    hole = np.array([[3.2, 3.2], [4.8, 3.2], [4.8, 4.8], [3.2, 4.8]])
    polygons = {"tumour": [tumour], "exclusion": [hole]}
    mask = rasterise(polygons, (8, 8), 1.0)
    expected = np.zeros((8, 8), bool)
    expected[2:6, 2:6] = True
    expected[3:5, 3:5] = False
    assert mask.sum() == 12 and np.array_equal(mask, expected)
    coarse = rasterise(polygons, (4, 4), 2.0)
    assert coarse.sum() == 4 and coarse[1:3, 1:3].all()


def test_asap_xml_groups(slide_file, tmp_path):
    polygons = read_asap(slide_file.parent / "tumor_001.xml")
    assert len(polygons["tumour"]) == 1 and len(polygons["exclusion"]) == 1
    assert polygons["tumour"][0].shape == (24, 2)
    mask = rasterise(polygons, (512, 768), 1.0)
    hole = rasterise({"tumour": polygons["exclusion"], "exclusion": []}, (512, 768), 1.0)
    assert mask.sum() > 1000 and not (mask & hole).any() and hole.sum() > 0
    from datamodules.phantoms.slides import asap_xml

    (tmp_path / "odd.xml").write_text(asap_xml([polygon_of((5, 5), (3, 3))], []).replace('"Tumor"', '"Stroma"', 1))
    with pytest.raises(DataError, match="odd.xml: annotation group 'Stroma'"):
        read_asap(tmp_path / "odd.xml")
    (tmp_path / "broken.xml").write_text("<ASAP_Annotations><Annot")
    with pytest.raises(DataError, match="cannot read .*broken.xml as ASAP XML"):
        read_asap(tmp_path / "broken.xml")


def test_tissue_is_found_on_the_thumbnail(slide_file):
    s = Slide(slide_file)
    tissue = tissue_mask(s.thumbnail(3))
    assert tissue[32, 48] and not tissue[2, 2] and 0.2 < tissue.mean() < 0.7


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_bad_slides_are_one_sentence(tmp_path, backend):
    (tmp_path / "text.tif").write_text("not a slide")
    with pytest.raises(DataError, match="cannot read .*text.tif as a slide"):
        Slide(tmp_path / "text.tif", backend)
    with pytest.raises(DataError, match="missing slide"):
        Slide(tmp_path / "absent.tif", backend)


@pytest.mark.real_data
def test_the_real_svs_reads_alike_by_region_in_both_readers():
    path = real("WSI-sample") / "cmu_small_region.svs"
    a, b = Slide(path, "tifffile"), Slide(path, "openslide")
    assert a.real_levels == b.real_levels == 1 and a.dimensions[0] == (2220, 2967)
    assert len(a.downsamples) >= 3 and a.downsamples[1] == 2.0  # virtual levels
    regions = [(0, (200, 100), (256, 256)), (0, (2100, 2900), (256, 128)), (1, (512, 512), (300, 200))]
    for level, location, size in regions:
        assert np.array_equal(a.read_region(location, level, size), b.read_region(location, level, size))
    tissue = tissue_mask(a.thumbnail(a.best_level(32)))
    assert 0.05 < tissue.mean() < 0.95
