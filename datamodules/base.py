"""SegmentationDataModule: split lists, label budget, the two training streams, whole-case evaluation loaders.

A subclass says where its files are and how one training sample / one evaluation case is made; this class
checks every file before training (missing file, unreadable h5, missing key, labels outside ``num_classes``:
one ``DataError`` naming the path), applies the label budget and builds the loaders.

Training batches: one plain stream ``{"image", "label", "case"}`` when ``labeled_batch_size`` is unset (or
equals ``batch_size``), else ``{"labeled": ..., "unlabeled": ...}`` from a ``CombinedLoader`` in
``max_size_cycle`` mode (the shorter stream cycles, as SSL4MIS's TwoStreamBatchSampler cycles labeled
permutations against an endless unlabeled stream). Each stream is a ``StreamLoader``: its order and every
sample's augmentations follow from the seed and the position alone, and the position is saved in checkpoints,
so a run resumed mid-epoch sees the batches of an uninterrupted one, whatever ``num_workers`` is.
Evaluation yields one whole case per batch:
``{"image": [1, C, *S], "label": [1, *S], "case": [id], "spacing": [tuple | None]}``.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import h5py
import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader, rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lemis.errors import ConfigError, DataError

SPLIT_RULES = ("first", "random")
STREAMS = ("labeled", "unlabeled")


def read_list(path: Path) -> list[str]:
    """Non-empty stripped lines of a split list file."""
    if not path.is_file():
        raise DataError(f"split list {path} not found.")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_h5(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named datasets of an h5 file (plus its attributes under ``"attrs"``), with one-sentence errors."""
    if not path.is_file():
        raise DataError(f"missing file {path}.")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in keys if k not in f]
            if missing:
                raise DataError(f"{path} has no key {missing[0]!r} (it has {sorted(f.keys())}).")
            out = {k: f[k][()] for k in keys}
            out["attrs"] = dict(f.attrs)
            return out
    except DataError:
        raise
    except Exception as err:  # h5py raises OSError/KeyError/RuntimeError variants for damaged files
        raise DataError(f"cannot read {path} as HDF5 (corrupt or truncated file: {type(err).__name__}).") from None


def check_label(label: np.ndarray, num_classes: int, path: Path) -> None:
    """Labels must be integers in [0, num_classes)."""
    low, high = int(label.min()), int(label.max())
    if low < 0 or high >= num_classes:
        bad = sorted(int(v) for v in np.unique(label) if v < 0 or v >= num_classes)
        raise DataError(f"{path} has label values {bad} outside 0..{num_classes - 1} "
                        f"(data.init_args.num_classes={num_classes}).")


def check_image(data: dict, path: Path) -> None:
    """Image values must be finite, and a label must cover the image's spatial axes (its last label.ndim axes):
    a NaN volume would otherwise score Dice 0 without a word, a NaN slice stop training without a file name."""
    image = data["image"]
    if not np.isfinite(image).all():
        bad = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
        raise DataError(f"{path} has {bad} NaN/inf values in 'image'.")
    label = data.get("label")
    if label is not None and image.shape[image.ndim - label.ndim:] != label.shape:
        raise DataError(f"{path} has image shape {image.shape} but label shape {label.shape}.")


def budget_count(budget, n_groups: int) -> int:
    """Number of labeled groups of a budget: an integer is a count, a float in (0, 1] a fraction of the groups.

    ``labeled: 7`` is 7 patients, ``labeled: 0.1`` of 70 patients is 7 and ``labeled: 1.0`` all of them; a float
    outside (0, 1] (``2.5``, ``7.0``) is an error rather than a silent truncation to a count.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ConfigError(f"data.init_args.labeled must be a count (integer) or a fraction in (0, 1], got {budget!r}.")
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ConfigError(f"data.init_args.labeled={budget} is neither a count (write an integer) nor a "
                              f"fraction in (0, 1] of the training patients/cases.")
        return round(budget * n_groups)
    return budget


def select_labeled(groups: list[str], budget: int | float, rule: str = "first", seed: int = 0) -> list[str]:
    """The labeled groups (patients / cases) of a budget, from ``groups`` in order of first appearance.

    budget: see ``budget_count``. rule ``first``: the first N groups in file order (reproduces SSL4MIS's
    3 -> 68 and 7 -> 136 slices); ``random``: N groups drawn with ``seed``.
    """
    if rule not in SPLIT_RULES:
        raise ConfigError(f"data.init_args.split_rule must be one of {SPLIT_RULES}, got {rule!r}.")
    unique = list(dict.fromkeys(groups))
    n = budget_count(budget, len(unique))
    if not 1 <= n <= len(unique):
        raise ConfigError(f"data.init_args.labeled={budget} is impossible: between 1 and {len(unique)} "
                          f"(the number of training patients/cases available) are needed.")
    if rule == "first":
        return unique[:n]
    return random.Random(seed).sample(unique, n)


class SampleDataset(Dataset):
    """Items read by ``load(item) -> dict`` and turned into tensors by ``make(sample) -> dict``.

    A key is an index, or ``(index, seed)`` from a ``StreamSampler``: then ``make`` (the augmentations) draws
    from that seed alone (see ``seeded``).
    """

    def __init__(self, items: list[str], load: Callable[[str], dict], make: Callable[[dict], dict]):
        self.items, self.load, self.make = items, load, make

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        if isinstance(key, tuple):
            index, seed = key
            with seeded(seed):
                return self.make(self.load(self.items[index]))
        return self.make(self.load(self.items[key]))


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch (CPU), numpy and ``random`` seeded by ``seed``, then put their states back.

    A sample's augmentations then depend on its seed only: not on the worker that makes it, on what training drew
    before, nor on a restart; and making it leaves the caller's random stream untouched. CUDA generators are left
    alone (augmentations run on CPU; ``torch.manual_seed`` would reseed them too).
    """
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


class StreamSampler(DistributedSampler):
    """``(index, augmentation seed)`` pairs of one training stream, one shuffled pass after another.

    Pass ``cycle`` of epoch ``epoch`` (Lightning calls ``set_epoch``; the shorter of two streams runs several
    passes per epoch) is drawn from (seed, stream, epoch, cycle) alone, so a resumed run redraws the interrupted
    pass and starts at ``start``. Under DDP each rank takes every ``num_replicas``-th item of the pass, padded
    to equal length as DistributedSampler does; being a DistributedSampler, Lightning keeps it rather than
    injecting its own.
    """

    def __init__(self, dataset: Dataset, seed: int, stream: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.stream = stream
        self.cycle, self.start = 0, 0  # set by StreamLoader before each pass

    def __iter__(self) -> Iterator[tuple[int, int]]:
        entropy = np.random.SeedSequence([self.seed, self.stream, self.epoch, self.cycle])
        generator = torch.Generator().manual_seed(int(entropy.generate_state(1, np.uint64)[0]))
        n = len(self.dataset)
        order = torch.randperm(n, generator=generator).tolist()
        seeds = torch.randint(0, 2**31, (n,), generator=generator).tolist()
        order = (order * -(-self.total_size // n))[:self.total_size]
        mine = order[self.rank:self.total_size:self.num_replicas]
        return iter([(i, seeds[i]) for i in mine[self.start:]])


class StreamLoader(DataLoader):
    """The DataLoader of one training stream; its position travels with checkpoints.

    Lightning's fit loop stores ``state_dict()`` of training loaders that have one and gives it back through
    ``load_state_dict`` when a run resumes. The state is the pass under way (seed, epoch, cycle) and the batches
    it has yielded to training, counted here rather than in the sampler, which runs ahead when workers prefetch.
    A pass is chosen at the first ``next()`` after ``iter()``, so after Lightning's ``set_epoch``: a resumed run
    continues the saved pass if its epoch is still under way, and starts the next epoch's first pass otherwise.
    """

    sampler: StreamSampler

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch, self.cycle, self.batches = 0, -1, 0
        self._resuming = False

    def __iter__(self) -> Iterator:
        self._begin_pass()
        for batch in super().__iter__():
            self.batches += 1
            yield batch

    def _begin_pass(self) -> None:
        epoch = self.sampler.epoch
        if not (self._resuming and epoch == self.epoch):
            self.cycle, self.batches = (self.cycle + 1 if epoch == self.epoch else 0), 0
        self.epoch, self._resuming = epoch, False
        self.sampler.cycle, self.sampler.start = self.cycle, self.batches * self.batch_size

    def state_dict(self) -> dict:
        return {"seed": self.sampler.seed, "epoch": self.epoch, "cycle": self.cycle, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.seed = state["seed"]
        self.epoch, self.cycle, self.batches = state["epoch"], state["cycle"], state["batches"]
        self._resuming = True


def collate_case(batch: list[dict]) -> dict:
    """One whole case per batch: tensors get a batch axis, everything else becomes a one-item list."""
    (case,) = batch
    return {k: v[None] if isinstance(v, torch.Tensor) else [v] for k, v in case.items()}


class SegmentationDataModule(L.LightningDataModule):
    """Common options of every segmentation DataModule (see spec/datasets.md).

    Args:
        root: dataset folder in its community layout.
        num_classes: K, background included; every label read is checked against it.
        labeled: label budget (patients/cases, or a fraction).
        split_rule, split_seed: ``first`` (published) or ``random`` with a seed.
        batch_size: total training batch; labeled_batch_size: its labeled part (unset: labeled-only stream).
        patch_size: training patch (2D slice size or 3D crop).
        val_list, test_list, predict_list: evaluation lists (file names relative to ``root``).
        present: optional list file of the ids whose files exist; others are skipped (and counted in the log).
        num_workers: loader workers; cache: decode every file once into memory at setup.
    """

    class_names: tuple[str, ...] = ()
    train_list: str = ""

    def __init__(
        self,
        root: str,
        num_classes: int,
        labeled: int | float,
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
        self._cache: dict[tuple[Path, tuple], dict] = {}
        self.datasets: dict[str, Dataset] = {}
        self._check_streams()

    # ---- what a subclass provides -----------------------------------------------------------------------------
    def train_units(self) -> list[tuple[str, str]]:
        """(group, item) pairs of the training set in file order; the budget counts groups."""
        raise NotImplementedError

    def train_path(self, item: str) -> Path:
        raise NotImplementedError

    def case_path(self, case: str) -> Path:
        raise NotImplementedError

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
        """The training batch's streams (contracts.DeclaresStreams)."""
        return STREAMS if self.two_streams else STREAMS[:1]

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
    def _read(self, path: Path, keys: tuple[str, ...]) -> dict:
        key = (path, keys)
        if key in self._cache:
            return self._cache[key]
        data = read_h5(path, keys)
        check_image(data, path)
        if "label" in keys:
            check_label(data["label"], self.num_classes, path)
        if self.cache:
            self._cache[key] = data
        return data

    def _reader(self, path_of: Callable[[str], Path], keys: tuple[str, ...]) -> Callable[[str], dict]:
        """item -> its arrays (checked, cached) plus its id under "case"."""
        return lambda item: {**self._read(path_of(item), keys), "case": item}

    def _checked(self, items: list[str], path_of: Callable[[str], Path], keys: tuple[str, ...]) -> list[str]:
        """Read every file once before training so bad input fails now, not at step 10,000."""
        for item in items:
            self._read(path_of(item), keys)
        return items

    def _check_present(self, items: list[str], path_of: Callable[[str], Path], list_name: str, hint: str) -> None:
        """Every file a list names exists, or one DataError saying how many are missing and what to do."""
        missing = [i for i in items if not path_of(i).is_file()]
        if missing:
            raise DataError(f"{len(missing)} of the {len(items)} files named by {list_name} are missing (first: "
                            f"{path_of(missing[0])}); {hint}, or skip absent ids with --data.init_args.present=FILE.")

    def eval_cases(self, stage: str) -> list[str]:
        """Case ids of an evaluation stage (val/test/predict) from its list file."""
        name = self.lists[stage]
        return self._present_filter(read_list(self.root / name), name)

    def _eval_dataset(self, stage: str) -> Dataset:
        cases = self.eval_cases(stage)
        option = f"data.init_args.{stage}_list"
        if not cases:
            raise DataError(f"{self.root / self.lists[stage]} names no case to evaluate ({option}).")
        self._check_present(cases, self.case_path, self.lists[stage], f"name another split with --{option}=FILE")
        keys = ("image",) if stage == "predict" else ("image", "label")
        self._checked(cases, self.case_path, keys)
        return SampleDataset(cases, self._reader(self.case_path, keys), lambda d: self.eval_case(d, d["case"]))

    def _train_datasets(self) -> None:
        groups, labeled, unlabeled = self.split()
        if self.two_streams and not unlabeled:
            raise ConfigError(f"data.init_args.labeled={self.labeled} leaves no unlabeled training data for a "
                              f"two-stream run; set data.init_args.labeled_batch_size to null for a labeled-only run.")
        rank_zero_info(f"lemis: label budget {self.labeled} -> {len(groups)} groups, {len(labeled)} labeled "
                       f"items, {len(unlabeled)} unlabeled items.")
        self.labeled_groups = groups
        self._check_present(labeled + (unlabeled if self.two_streams else []), self.train_path, self.train_list,
                            "fix data.init_args.root")
        both, image_only = ("image", "label"), ("image",)
        self._checked(labeled, self.train_path, both)
        self.datasets["labeled"] = SampleDataset(labeled, self._reader(self.train_path, both),
                                                 lambda d: self.train_sample(d, d["case"]))
        if self.two_streams:
            # Unlabeled labels are never read, so a budget experiment cannot leak them.
            self._checked(unlabeled, self.train_path, image_only)
            self.datasets["unlabeled"] = SampleDataset(unlabeled, self._reader(self.train_path, image_only),
                                                       lambda d: self.train_sample(d, d["case"]))
            n_lab = self.labeled_batch_size
            for name, n in (("labeled", n_lab), ("unlabeled", self.batch_size - n_lab)):
                if len(self.datasets[name]) < n:
                    raise ConfigError(f"the {name} stream has {len(self.datasets[name])} items, fewer than its "
                                      f"batch of {n} (data.init_args.batch_size / "
                                      f"data.init_args.labeled_batch_size).")

    def setup(self, stage: str | None = None) -> None:
        if not self.root.is_dir():
            raise DataError(f"data root {self.root} does not exist (set data.init_args.root).")
        if stage in ("fit", None) and "labeled" not in self.datasets:
            self._train_datasets()
        for name, stages in (("val", ("fit", "validate", None)), ("test", ("test",)), ("predict", ("predict",))):
            if stage in stages and name not in self.datasets:
                self.datasets[name] = self._eval_dataset(name)

    def first_image(self, stage: str) -> torch.Tensor:
        """The image [C, *S] of the first item a stage reads (after ``setup(stage)``); a training item is drawn
        with augmentation seed 0, leaving the caller's random state as it was."""
        name = {"fit": "labeled", "validate": "val"}.get(stage, stage)
        return self.datasets[name][(0, 0) if stage == "fit" else 0]["image"]

    # ---- loaders -----------------------------------------------------------------------------------------------
    def _worker_options(self) -> dict:
        return {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0,
                "pin_memory": torch.cuda.is_available()}

    def _cases(self, name: str) -> DataLoader:
        """Whole cases of an evaluation split, in list order."""
        return DataLoader(self.datasets[name], batch_size=1, collate_fn=collate_case, **self._worker_options())

    def _stream(self, name: str, batch_size: int, drop_last: bool) -> StreamLoader:
        """A shuffled training stream; its seed is the run's (``seed_everything``), rank 0's under DDP."""
        trainer = self.trainer
        seed = trainer.strategy.broadcast(torch.initial_seed()) if trainer else torch.initial_seed()
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        dataset = self.datasets[name]
        sampler = StreamSampler(dataset, seed, STREAMS.index(name), num_replicas=world, rank=rank)
        return StreamLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                            **self._worker_options())

    def train_dataloader(self):
        if not self.two_streams:
            # SSL4MIS's supervised script: a shuffled loader over the labeled slices, last partial batch kept.
            return self._stream("labeled", self.batch_size, False)
        n_lab = self.labeled_batch_size
        n_unl = self.batch_size - n_lab
        loaders = {"labeled": self._stream("labeled", n_lab, True),
                   "unlabeled": self._stream("unlabeled", n_unl, True)}
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self):
        return self._cases("val")

    def test_dataloader(self):
        return self._cases("test")

    def predict_dataloader(self):
        return self._cases("predict")
