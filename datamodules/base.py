"""SegmentationDataModule: split lists, label budget, declared training streams, whole-case evaluation loaders.

A subclass says where its files are (``train_path``/``case_path``: a location its ``reader`` reads), how one
training sample and one evaluation case are made, and, if it needs more than the labeled/unlabeled pair, which
streams a batch has (``streams``). This class reads and checks every file before training (missing file,
unreadable file, missing key, NaN/inf images, label/image shape, labels outside ``num_classes`` after the
``targets`` hook: one ``DataError`` naming the path), applies the label budget and builds the loaders.

Training batches: the declared streams (``datamodules.streams``), ``{"labeled": ..., "unlabeled": ...}`` for the
teacher methods, the labeled batch itself for a labeled-only run. Evaluation yields one whole case per batch:
``{"image": [1, C, *S], "label": [1, *S], "case": [id], "spacing": [tuple | None]}``.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from datamodules.budget import select_labeled
from datamodules.hierarchy import Hierarchy
from datamodules.readers import H5Reader, Reader, check_image, check_label, read_list
from datamodules.streams import SampleDataset, Stream, collate_case, stream_loaders
from lemis.errors import ConfigError, DataError

STREAMS = ("labeled", "unlabeled")


class SegmentationDataModule(L.LightningDataModule):
    """Common options of every segmentation DataModule (see spec/datasets.md).

    Args:
        root: dataset folder in its community layout.
        num_classes: K, background included; every label read is checked against it.
        labeled: label budget (patients/cases, or a fraction; unset: every training case is labeled).
        split_rule, split_seed: ``first`` (published) or ``random`` with a seed.
        batch_size: total training batch; labeled_batch_size: its labeled part (unset: labeled-only stream).
        patch_size: training patch (2D slice size or 3D crop).
        val_list, test_list, predict_list: evaluation lists (file names relative to ``root``).
        present: optional list file of the ids whose files exist; others are skipped (and counted in the log).
        num_workers: loader workers; cache: decode every file once into memory at setup.
        coarse_mapping: {superclass id: [fine ids]} (``datamodules.hierarchy``): every training item also
            carries ``coarse_label`` (its superclass mask) and ``granularity``; ``labeled`` then counts the
            fine-labeled groups (stream ``labeled``: image, label, coarse_label, granularity 1) and every other
            training item is coarse-labeled (stream ``unlabeled``: image, coarse_label, granularity 0; its fine
            mask is read only to derive the coarse one, which replaces it when read).
    """

    class_names: tuple[str, ...] = ()
    train_list: str = ""
    reader: Reader = H5Reader()
    ignore_index: int | None = None  # a label value the loss and metrics leave out (nnU-Net's "ignore")

    def __init__(
        self,
        root: str,
        num_classes: int,
        labeled: int | float | None = None,
        split_rule: str = "first",
        split_seed: int = 0,
        batch_size: int = 24,
        labeled_batch_size: int | None = None,
        patch_size: tuple[int, ...] = (256, 256),
        val_list: str = "val.list",
        test_list: str = "test.list",
        predict_list: str | None = None,
        present: str | None = None,
        num_workers: int = 2,
        cache: bool = True,
        coarse_mapping: dict[int, list[int]] | None = None,
    ):
        super().__init__()
        self.root = Path(root)
        self.num_classes = num_classes
        self.labeled, self.split_rule, self.split_seed = labeled, split_rule, split_seed
        self.batch_size, self.labeled_batch_size = batch_size, labeled_batch_size
        self.patch_size = tuple(patch_size)
        self.lists = {"val": val_list, "test": test_list, "predict": predict_list or test_list}
        self.present = present
        self.num_workers, self.cache = num_workers, cache
        self._cache: dict[tuple, dict] = {}
        self.datasets: dict[str, Dataset] = {}
        self._streams: list[Stream] = []
        self.hierarchy = Hierarchy.from_mapping(coarse_mapping) if coarse_mapping else None
        if self.hierarchy and self.hierarchy.num_fine != num_classes:
            raise ConfigError(f"data.init_args.coarse_mapping has {self.hierarchy.num_fine} fine classes (background "
                              f"included) but data.init_args.num_classes={num_classes}.")
        self._check_streams()

    # ---- what a subclass provides -----------------------------------------------------------------------------
    def train_units(self) -> list[tuple[str, str]]:
        """(group, item) pairs of the training set in file order; the budget counts groups."""
        raise NotImplementedError

    def train_path(self, item: str):
        """The location of a training item, as ``reader`` reads it (a file; for NIfTI ``{key: file(s)}``)."""
        raise NotImplementedError

    def case_path(self, case: str):
        """The location of an evaluation case."""
        raise NotImplementedError

    def targets(self, stream: str, data: dict, location) -> dict:
        """Derive or drop keys of one item of ``stream`` (a training stream's name, or val/test/predict) after
        reading and before the checks: remap labels (BraTS 4 -> 3), derive coarse labels or image labels. A
        derived target of an unlabeled item must come from what that stream reads, never from its labels."""
        return data

    def train_sample(self, data: dict, item: str) -> dict:
        """Augmented tensors of one training item: {"image": [C, *P], "label": [*P] (if read), "case"}."""
        raise NotImplementedError

    def eval_case(self, data: dict, case: str) -> dict:
        """Tensors of one whole case: {"image": [C, *S], "label": [*S], "case", "spacing"}."""
        raise NotImplementedError

    # ---- streams and budget -----------------------------------------------------------------------------------
    @property
    def two_streams(self) -> bool:
        return self.labeled_batch_size is not None and self.labeled_batch_size != self.batch_size

    @property
    def stream_names(self) -> tuple[str, ...]:
        """The training batch's streams (contracts.DeclaresStreams), known before setup."""
        return STREAMS if self.two_streams else STREAMS[:1]

    def streams(self) -> list[Stream]:
        """The training streams in batch order: the labeled items (labels read), and with a two-stream batch the
        unlabeled items (images only: labels that are not read cannot leak into a budget experiment). A
        DataModule with other streams overrides this (and ``stream_names``)."""
        groups, labeled, unlabeled = self.split()
        if self.two_streams and not unlabeled:
            raise ConfigError(f"data.init_args.labeled={self.labeled} leaves no unlabeled training data for a "
                              f"two-stream run; set data.init_args.labeled_batch_size to null for a labeled-only run.")
        rank_zero_info(f"lemis: label budget {self.labeled} -> {len(groups)} groups, {len(labeled)} labeled "
                       f"items, {len(unlabeled)} unlabeled items.")
        self.labeled_groups = groups
        if not self.two_streams:
            # SSL4MIS's supervised script: a shuffled loader over the labeled slices, last partial batch kept.
            return [Stream("labeled", labeled, ("image", "label"), self.batch_size, drop_last=False)]
        n_lab = self.labeled_batch_size
        unlabeled_keys = ("image", "label") if self.hierarchy else ("image",)  # coarse: label -> coarse_label
        return [Stream("labeled", labeled, ("image", "label"), n_lab),
                Stream("unlabeled", unlabeled, unlabeled_keys, self.batch_size - n_lab)]

    def image_label_stream(self, keys: tuple[str, ...]) -> list[Stream]:
        """The stream of a DataModule with image-level labels (``bag_label``; histopathology): every training item,
        full batches, ``keys`` read (``("image",)``, or with ``"label"`` where the mask only derives the image
        label); the budget's groups are the items' images or slides (``train_units``)."""
        groups, items, _ = self.split()
        self.labeled_groups = groups
        if len(items) < self.batch_size:
            raise ConfigError(f"{type(self).__name__} gives {len(items)} training items, fewer than "
                              f"data.init_args.batch_size={self.batch_size}.")
        return [Stream("labeled", items, keys, self.batch_size, drop_last=True)]

    def _check_streams(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"data.init_args.batch_size must be >= 1, got {self.batch_size}.")
        if self.labeled_batch_size is not None and not 1 <= self.labeled_batch_size <= self.batch_size:
            raise ConfigError(f"data.init_args.labeled_batch_size={self.labeled_batch_size} must be between 1 and "
                              f"data.init_args.batch_size={self.batch_size}.")

    def _present_filter(self, ids: list[str], list_name: str) -> list[str]:
        if self.present is None:
            return ids
        present = set(read_list(self.root / self.present))
        kept = [i for i in ids if i in present]
        if len(kept) < len(ids):
            rank_zero_info(f"lemis: {list_name}: skipped {len(ids) - len(kept)} of {len(ids)} ids "
                           f"not in {self.present}.")
        return kept

    def split(self) -> tuple[list[str], list[str], list[str]]:
        """(labeled groups, labeled items, unlabeled items) after the budget."""
        units = self.train_units()
        if not units:
            raise DataError(f"no training item under {self.root}: {self.train_list} is empty"
                            + (f" or names nothing in {self.present}." if self.present else "."))
        groups = select_labeled([g for g, _ in units], self.labeled, self.split_rule, self.split_seed)
        chosen = set(groups)
        labeled = [item for g, item in units if g in chosen]
        unlabeled = [item for g, item in units if g not in chosen]
        return groups, labeled, unlabeled

    # ---- reading (checked, optionally cached) --------------------------------------------------------------
    def _read(self, location, keys: tuple[str, ...], stream: str) -> dict:
        """The checked arrays of one location (cached by location, keys and stream)."""
        key = (str(location), keys, stream)
        if key in self._cache:
            return self._cache[key]
        data = self.targets(stream, self.reader.read(location, keys), location)
        if self.hierarchy and stream == "unlabeled" and "label" in data:
            check_label(data["label"], self.num_classes, location, self.ignore_index)
            data = {**data, "label": self.hierarchy.coarse(data["label"])}  # the fine mask is not kept
        check_image(data, location)
        if "label" in data:
            check_label(data["label"], self.num_classes, location, self.ignore_index)
        if self.cache:
            self._cache[key] = data
        return data

    def _dataset(self, stream: str, items: list[str], path_of: Callable, keys: tuple[str, ...],
                 make: Callable[[dict], dict], list_name: str, hint: str) -> SampleDataset:
        """A stream's or split's dataset after every file it names was found and read once (bad input fails
        now, not at step 10,000)."""
        missing = [i for i in items if not all(f.is_file() for f in self.reader.files(path_of(i)))]
        if missing:
            first = next(f for f in self.reader.files(path_of(missing[0])) if not f.is_file())
            raise DataError(f"{len(missing)} of the {len(items)} files named by {list_name} are missing (first: "
                            f"{first}); {hint}, or skip absent ids with --data.init_args.present=FILE.")
        self.check_items(stream, items, path_of, keys)
        load = lambda item: {**self._read(path_of(item), keys, stream), "case": item}  # noqa: E731
        return SampleDataset(items, load, make)

    def check_items(self, stream: str, items: list[str], path_of: Callable, keys: tuple[str, ...]) -> None:
        """Read every item once before training (a damaged file fails now, not at step 10,000). A DataModule
        whose items are regions of a few large files (slides) checks each file once instead."""
        for item in items:
            self._read(path_of(item), keys, stream)

    def eval_cases(self, stage: str) -> list[str]:
        """Case ids of an evaluation stage (val/test/predict) from its list file."""
        name = self.lists[stage]
        return self._present_filter(read_list(self.root / name), name)

    def _eval_dataset(self, stage: str) -> Dataset:
        cases = self.eval_cases(stage)
        option = f"data.init_args.{stage}_list"
        if not cases:
            raise DataError(f"{self.root / self.lists[stage]} names no case to evaluate ({option}).")
        keys = ("image",) if stage == "predict" else ("image", "label")
        return self._dataset(stage, cases, self.case_path, keys, lambda d: self.eval_case(d, d["case"]),
                             self.lists[stage], f"name another split with --{option}=FILE")

    def _train_datasets(self) -> None:
        self._streams = self.streams()
        for stream in self._streams:
            make = partial(self._training_sample, stream.name)
            self.datasets[stream.name] = self._dataset(stream.name, stream.items, self.train_path, stream.keys,
                                                       make, self.train_list, "fix data.init_args.root")
            if len(self._streams) > 1 and len(stream.items) < stream.batch_size:
                raise ConfigError(f"the {stream.name} stream has {len(stream.items)} items, fewer than its batch "
                                  f"of {stream.batch_size} (data.init_args.batch_size / "
                                  f"data.init_args.labeled_batch_size).")

    def _training_sample(self, stream: str, data: dict) -> dict:
        """``train_sample`` of one item, plus the hierarchy's keys: the coarse mask of a fine item is derived from
        its augmented label (nearest-neighbour transforms commute with the per-voxel mapping); a coarse item's
        label already is its coarse mask (``_read``) and is renamed, so no ``label`` leaves the stream."""
        sample = self.train_sample(data, data["case"])
        if self.hierarchy is None:
            return sample
        if stream == "labeled":
            return {**sample, "coarse_label": self.hierarchy.coarse(sample["label"]), "granularity": 1}
        coarse = sample.pop("label")
        return {**sample, "coarse_label": coarse, "granularity": 0}

    def setup(self, stage: str | None = None) -> None:
        if not self.root.is_dir():
            raise DataError(f"data root {self.root} does not exist (set data.init_args.root).")
        if stage in ("fit", None) and not self._streams:
            self._train_datasets()
        for name, stages in (("val", ("fit", "validate", None)), ("test", ("test",)), ("predict", ("predict",))):
            if stage in stages and name not in self.datasets:
                self.datasets[name] = self._eval_dataset(name)

    def first_image(self, stage: str) -> torch.Tensor:
        """The image [C, *S] of the first item a stage reads (after ``setup(stage)``); a training item is drawn
        with augmentation seed 0, leaving the caller's random state as it was."""
        name = self._streams[0].name if stage == "fit" else {"validate": "val"}.get(stage, stage)
        return self.datasets[name][(0, 0) if stage == "fit" else 0]["image"]

    # ---- loaders -----------------------------------------------------------------------------------------------
    def _worker_options(self) -> dict:
        return {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0,
                "pin_memory": torch.cuda.is_available()}

    def _cases(self, name: str) -> DataLoader:
        """Whole cases of an evaluation split, in list order."""
        return DataLoader(self.datasets[name], batch_size=1, collate_fn=collate_case, **self._worker_options())

    def train_dataloader(self):
        """The declared streams' loaders; the seed is the run's (``seed_everything``), rank 0's under DDP."""
        trainer = self.trainer
        seed = trainer.strategy.broadcast(torch.initial_seed()) if trainer else torch.initial_seed()
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        return stream_loaders(self._streams, self.datasets, seed, world, rank, **self._worker_options())

    def val_dataloader(self):
        return self._cases("val")

    def test_dataloader(self):
        return self._cases("test")

    def predict_dataloader(self):
        return self._cases("predict")
