"""What callbacks, the CLI and the demo read from a LightningModule or DataModule by name: declared here, once.

A method that offers one of these gets the callbacks that use it; nothing else in lemis reaches into a module by
attribute name. ``isinstance(module, TeacherMethod)`` checks a protocol (runtime_checkable: attribute names).
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class TeacherMethod(Protocol):
    """A method with a teacher that only callbacks write (``callbacks.ema_teacher.EMATeacher``; role reversal).

    ``net`` is the student; ``teacher`` is None until the callback creates it (a copy of ``net``) and is a
    registered submodule after, so it travels with checkpoints, devices and DDP. ``teacher_alpha(t)`` is the EMA
    coefficient after optimizer step t (0-based); ``ema_decay`` its plateau.
    """

    net: nn.Module
    teacher: nn.Module | None
    ema_decay: float

    def teacher_alpha(self, step: int) -> float: ...


@runtime_checkable
class EvaluatedModule(Protocol):
    """What the evaluation leaves for callbacks and the demo (``SegmentationModule`` has both).

    ``example``: the first evaluated case of the last evaluation, ``{"case", "image" [*S], "label" [*S],
    "prediction" [*S]}`` (numpy), so ``ImageLogger`` need not predict again; ``last_summary``:
    ``{stage: summarize(rows)}`` of the last evaluation.
    """

    example: dict | None
    last_summary: dict


@runtime_checkable
class DrawsTrainingSamples(Protocol):
    """``train_example``: a callable returning one training sample, ``{"image": [*S], <name>: [*S], ...}``
    (tensors), set by ``training_step`` and called only by ``ImageLogger`` on the steps it draws."""

    train_example: Callable[[], dict] | None


@runtime_checkable
class DeclaresStreams(Protocol):
    """A DataModule's training streams: ``stream_names`` in the order of the batch dict (``("labeled",)`` for a
    labeled-only run, ``("labeled", "unlabeled")`` for the teacher methods, any names a method needs)."""

    stream_names: tuple[str, ...]


@runtime_checkable
class UsesPseudoPool(Protocol):
    """``pseudo_pool``: a ``callbacks.pseudo_labels.PseudoPool`` (the teacher's maps of the training items by case
    id, ``lookup(cases, like)``) or None; written only by ``PseudoLabelRefresh``, read by the method's step."""

    pseudo_pool: object | None
