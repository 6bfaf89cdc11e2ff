"""SegmentationModule's seams: weights from a file, tuple/dict net outputs, post-processing, injected optimizer
and schedule, scorers whose rows summarize averages whatever their columns."""
import hashlib
from functools import partial

import pytest
import torch
from torch import nn

from lemis.errors import ConfigError
from lightning_modules.metrics import summarize
from lightning_modules.nets.unet2d import UNet2D
from lightning_modules.schedules import WarmupCosine
from lightning_modules.segmentation import SegmentationModule, WeightsFile, wants_total_steps


def small_net() -> UNet2D:
    return UNet2D(in_channels=1, num_classes=3, channels=(4, 8, 16, 32, 64))


def test_init_weights_from_a_state_dict_and_from_a_checkpoint_prefix(tmp_path):
    torch.manual_seed(0)
    source = small_net()
    path = tmp_path / "net.pt"
    torch.save(source.state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    module = SegmentationModule(net=small_net(), num_classes=3, init_weights=WeightsFile(str(path), sha256=digest))
    for a, b in zip(module.net.state_dict().values(), source.state_dict().values()):
        assert torch.equal(a, b)
    ckpt = tmp_path / "run.ckpt"  # a lemis checkpoint: student under "net.", teacher under "teacher."
    torch.save({"state_dict": {**{f"net.{k}": v for k, v in source.state_dict().items()},
                               **{f"teacher.{k}": v * 0 for k, v in source.state_dict().items()}}}, ckpt)
    module = SegmentationModule(net=small_net(), num_classes=3, init_weights=WeightsFile(str(ckpt), prefix="net."))
    assert torch.equal(next(module.net.parameters()), next(source.parameters()))


@pytest.mark.parametrize("case,needle", [
    ("missing", r"not found \(model.init_args.init_weights.path\)"),
    ("digest", "sha256"),
    ("prefix", "no key starting with 'student.'"),
    ("mismatch", "does not fit the net"),
    ("text", "cannot read weights file"),
])
def test_bad_weights_are_one_sentence_naming_the_file(case, needle, tmp_path):
    path = tmp_path / "w.pt"
    if case == "text":
        path.write_text("hello")
    elif case != "missing":
        torch.save(UNet2D(1, 2, channels=(4, 8, 16, 32, 64)).state_dict() if case == "mismatch"
                   else small_net().state_dict(), path)
    spec = WeightsFile(str(path), sha256="0" * 64 if case == "digest" else None,
                       prefix="student." if case == "prefix" else "")
    with pytest.raises(ConfigError, match=needle) as err:
        SegmentationModule(net=small_net(), num_classes=3, init_weights=spec)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


class TwoHeads(nn.Module):
    """A tuple-output net: (fine logits, coarse logits)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(1, 3, 1)
        self.coarse = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        fine = self.body(x)
        return fine, self.coarse(fine)


class Coarse(SegmentationModule):
    def logits(self, output):
        return output[1]


def test_tuple_outputs_map_to_the_evaluated_logits():
    x = torch.randn(2, 1, 8, 8)
    label = torch.randint(0, 3, (2, 8, 8))
    first = SegmentationModule(net=TwoHeads(), num_classes=3, roi_size=(8, 8))
    assert first.training_step({"image": x, "label": label}, 0).ndim == 0
    assert first.predict_case(torch.randn(1, 1, 2, 8, 8)).shape == (1, 3, 2, 8, 8)  # output[0] by default
    assert Coarse(net=TwoHeads(), num_classes=2, roi_size=(8, 8)).predict_case(
        torch.randn(1, 1, 2, 8, 8)).shape == (1, 2, 2, 8, 8)


def test_threshold_post_processing():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.45, 0.35], [0.1, 0.1, 0.8]]).T.reshape(1, 3, 3)
    argmax = SegmentationModule(net=nn.Identity(), num_classes=3, roi_size=(3,))
    thresholded = SegmentationModule(net=nn.Identity(), num_classes=3, roi_size=(3,), postprocess="threshold",
                                     threshold=0.4)
    assert argmax.label_map(probs).tolist() == [[0, 1, 2]]
    assert thresholded.label_map(probs).tolist() == [[0, 1, 2]]  # 0.3 < 0.4: background; 0.45, 0.8 > 0.4
    thresholded.hparams.threshold = 0.5
    assert thresholded.label_map(probs).tolist() == [[0, 0, 2]]


def test_injected_optimizer_groups_and_schedule_length():
    class TwoRates(SegmentationModule):
        def param_groups(self):
            return [{"params": self.net.body.parameters(), "lr": 0.1}, {"params": self.net.coarse.parameters()}]

    module = TwoRates(net=TwoHeads(), num_classes=3, optimizer=partial(torch.optim.Adam, lr=0.01),
                      lr_scheduler=partial(WarmupCosine, warmup_steps=2), lr_interval="epoch")
    assert wants_total_steps(module.scheduler_factory)
    optimizer, scheduler = module.build_optimizer(total=10)
    assert isinstance(optimizer, torch.optim.Adam) and [g["lr"] for g in optimizer.param_groups] == [0.05, 0.005]
    assert scheduler.total_steps == 10
    fixed = SegmentationModule(net=TwoHeads(), num_classes=3, lr_scheduler=partial(WarmupCosine, total_steps=4))
    assert not wants_total_steps(fixed.scheduler_factory)


def test_summarize_averages_any_numeric_columns():
    per_image = [{"case": "a", "f1": 0.5, "iou": 0.25}, {"case": "b", "f1": 1.0, "iou": 0.75}]
    assert summarize(per_image) == {"f1/mean": 0.75, "iou/mean": 0.5, "n_empty": 0, "n_cases": 2}
    per_class = [{"case": "a", "class": "x", "dice": 0.2, "empty": 1}, {"case": "a", "class": "y", "dice": 0.6,
                                                                         "empty": 0}]
    assert summarize(per_class) == pytest.approx({"dice/x": 0.2, "dice/y": 0.6, "dice/mean": 0.4, "n_empty": 1,
                                                  "n_cases": 1})
