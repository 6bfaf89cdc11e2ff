"""Small generated datasets in exactly the community layouts (`spec/datasets.md`), for tests and the demo.

- ``make_acdc``: the SSL4MIS ACDC layout. Each patient has an ED (frame01) and an ES (frame02) frame of a
  short-axis stack (slice 0 = base, last slice = apex): LV cavity (3) = filled ellipse, myocardium (2) = ring
  around it, RV (1) = crescent against the septum that ends before the apex. At ES the cavity shrinks and the
  wall thickens (myocardial area is kept). Images: bright blood, dark myocardium, thorax with fat/organ blobs,
  partial volume blur, smooth bias field, Rician noise, then per-volume min-max to [0, 1] as SSL4MIS.
- ``make_la``: the UA-MT LA layout. A left atrium = smooth union of ellipsoids with pulmonary-vein stubs,
  bright in a textured thorax with a bright aorta, bias and noise; z-scored over a larger field of view and
  cropped around the atrium as UA-MT did, so the stored crop has a positive mean like the real files.

Every file is written atomically; ``ensure_phantoms`` caches a generated root behind a ``.complete`` marker.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

from datamodules.phantoms import acdc, brats, digestpath, glas, la, nnunet, slides
from datamodules.phantoms.acdc import make_acdc
from datamodules.phantoms.brats import make_brats
from datamodules.phantoms.digestpath import make_digestpath
from datamodules.phantoms.glas import make_glas
from datamodules.phantoms.la import LA_FOLDER, make_la
from datamodules.phantoms.nnunet import make_nnunet
from datamodules.phantoms.slides import make_camelyon16
from lemis.files import atomic_path

__all__ = ["LA_FOLDER", "MARKER", "PHANTOMS", "ensure_phantoms", "make_acdc", "make_brats", "make_camelyon16",
           "make_digestpath", "make_glas", "make_la", "make_nnunet"]

MARKER = ".complete"
# DataModule class path -> (phantom kind, maker, the options that shrink its experiments for tests: a bare name
# is a data option, a dotted one a full key, e.g. the net's channels for the phantom's)
PHANTOMS = {"datamodules.acdc.ACDCDataModule": ("acdc", make_acdc, acdc.TEST_SIZE),
            "datamodules.la.LADataModule": ("la", make_la, la.TEST_SIZE),
            "datamodules.nnunet.NnUNetDataModule": ("nnunet", make_nnunet, nnunet.TEST_SIZE),
            "datamodules.brats.BraTSDataModule": ("brats", make_brats, brats.TEST_SIZE),
            "datamodules.glas.GlaSDataModule": ("glas", make_glas, glas.TEST_SIZE),
            "datamodules.camelyon16.Camelyon16DataModule": ("camelyon16", make_camelyon16, slides.TEST_SIZE),
            "datamodules.digestpath.DigestPathDataModule": ("digestpath", make_digestpath, digestpath.TEST_SIZE),
            # SEMISE (datamodules.severity) on the ACDC phantom: a graded batch the phantom fills, a warm-up that
            # fits the tests' two steps
            "datamodules.severity.ACDCSeverityDataModule": ("acdc", make_acdc, {
                **acdc.TEST_SIZE, "graded_batch_size": 4, "model.init_args.lr_scheduler.init_args.warmup_steps": 1})}

_MAKERS = {kind: maker for kind, maker, _ in PHANTOMS.values()}


def ensure_phantoms(kind: str, root, **kw) -> Path:
    """Generate the ``kind`` phantom (a kind of ``PHANTOMS``: "acdc", "la", "nnunet", "brats", "glas",
    "camelyon16", "digestpath") in ``root`` unless ``root/.complete`` is there.

    The marker is written last and records the parameters, so an interrupted generation is redone on the next
    call, and a root made with other parameters is refused rather than silently reused.
    """
    if kind not in _MAKERS:
        raise ValueError(f"unknown phantom kind {kind!r}: expected one of {sorted(_MAKERS)}")
    root = Path(root)
    bound = inspect.signature(_MAKERS[kind]).bind(root, **kw)
    bound.apply_defaults()
    params = json.dumps({"kind": kind, **{k: v for k, v in bound.arguments.items() if k != "root"}}, sort_keys=True)
    marker = root / MARKER
    if marker.exists():
        if marker.read_text() != params:
            raise ValueError(f"{root} holds a phantom made with {marker.read_text()}, not {params}: "
                             f"delete the folder or choose another root")
        return root
    _MAKERS[kind](root, **kw)
    with atomic_path(marker) as tmp:
        tmp.write_text(params)
    return root
