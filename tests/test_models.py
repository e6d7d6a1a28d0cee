"""Models, the study's losses, the variants' transforms, and checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.transforms import v2

from cxrlab.config.load import load_params
from cxrlab.data.datasets import (
    EpochSampler,
    ImageArrayDataset,
    LoaderSettings,
    Split,
    build_augment,
    make_loader,
    set_epoch,
)
from cxrlab.errors import UserError
from cxrlab.model.backbones import (
    build_model,
    checkpoint_meta,
    count_parameters,
    head,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from cxrlab.model.losses import StudyLoss, l2_penalty
from cxrlab.training.build import Splits, make_loaders
from cxrlab.training.engine import predict, train_one_epoch
from cxrlab.training.runtime import Runtime
from tests.conftest import ROOT

CPU = Runtime(device=torch.device("cpu"))
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tiny_split(n: int = 12, size: int = 16, subset: str = "train") -> Split:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    labels = np.arange(n) % 2
    rows = [{"filename": f"x{i}.png", "label": str(labels[i]), "class": "AB"[labels[i]], "subset": subset}
            for i in range(n)]
    return Split(images, labels.astype(np.int64), rows, ["A", "B"])


def test_resnet50_from_scratch_has_the_studys_parameter_count():
    model = build_model("resnet50", 2)
    assert count_parameters(model) == 23_512_130
    assert head(model)[0] == "fc" and head(model)[1].out_features == 2


@pytest.mark.parametrize("variant, fc_type, augment", [
    ("baseline", nn.Linear, []),
    ("regu_penalty", nn.Linear, []),
    ("dropout", nn.Sequential, []),
    ("sharpness", nn.Linear, [(v2.RandomAdjustSharpness, {"sharpness_factor": 1.2, "p": 0.2})]),
    ("contrast", nn.Linear, [(v2.ColorJitter, {"contrast": (0.8, 1.2)})]),
])
def test_each_variant_builds_its_model_and_training_transform(variant, fc_type, augment):
    params = load_params(ROOT / "params.yaml")
    cfg = params.variant(variant)
    assert cfg.l2_penalty == (0.001 if variant == "regu_penalty" else 0.0)
    model = build_model(cfg.arch, 2, cfg.dropout)
    assert count_parameters(model) == 23_512_130  # dropout adds no weights
    assert isinstance(model.fc, fc_type)
    if variant == "dropout":
        assert isinstance(model.fc[0], nn.Dropout) and model.fc[0].p == 0.5
        assert isinstance(model.fc[1], nn.Linear) and model.fc[1].in_features == 2048

    split = tiny_split()
    loader, val_loader, test_loader = make_loaders(cfg, Splits(split, split, split), CPU, 0, LoaderSettings())
    transform = loader.dataset.transform
    if not augment:
        assert transform is None
    else:
        steps = transform.transforms
        assert [type(s) for s in steps] == [cls for cls, _ in augment]
        for step, (_, attrs) in zip(steps, augment):
            for name, value in attrs.items():
                got = getattr(step, name)
                assert (tuple(got) if isinstance(value, tuple) else got) == pytest.approx(value)
    # evaluation never augments
    assert val_loader.dataset.transform is None and test_loader.dataset.transform is None


def test_evaluation_input_is_the_plain_normalised_image():
    split = tiny_split(size=32)
    model = build_model("resnet18", 2).eval()
    cfg = load_params(ROOT / "params.yaml").variant("contrast")
    loader = make_loaders(cfg, Splits(split, split, split), CPU, 0, LoaderSettings())[1]
    prob, labels = predict(model, loader, CPU, MEAN, STD)
    x = torch.from_numpy(split.images).float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = torch.softmax(model(x), 1).numpy()
    np.testing.assert_allclose(prob, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(labels, split.labels)


def test_augmentation_depends_only_on_seed_epoch_and_index():
    split = tiny_split(n=8, size=32)
    dataset = ImageArrayDataset(split, build_augment({"ColorJitter": {"contrast": 0.9}}), seed=3)
    first = dataset.__getitems__([5, 1, 2])[0]
    again = dataset.__getitems__([2, 5])[0]
    assert torch.equal(first[0], again[1]) and torch.equal(first[2], again[0])
    assert not torch.equal(first[0], torch.from_numpy(split.images[5]))  # it did augment
    assert torch.equal(dataset.__getitems__([(0, 5)])[0][0], first[0])  # a plain index is epoch 0
    assert not torch.equal(dataset.__getitems__([(1, 5)])[0][0], first[0])


def test_batches_come_back_in_sampler_order_with_their_labels():
    split = tiny_split(n=10)
    images, labels = ImageArrayDataset(split).__getitems__([7, 2, 9, 2])
    assert torch.equal(images, torch.from_numpy(split.images[[7, 2, 9, 2]]))
    assert labels.tolist() == [1, 0, 1, 0]


def test_shuffle_order_is_reseeded_per_epoch():
    split = tiny_split(n=20)
    cfg = load_params(ROOT / "params.yaml").variant("baseline")
    loader = make_loaders(cfg, Splits(split, split, split), CPU, 0, LoaderSettings())[0]

    set_epoch(loader, 1)
    first = [img.sum().item() for img, _ in loader]
    set_epoch(loader, 1)
    assert [img.sum().item() for img, _ in loader] == first
    set_epoch(loader, 2)
    assert [img.sum().item() for img, _ in loader] != first


def batches(loader, epochs=(1, 2)):
    out = []
    for epoch in epochs:
        set_epoch(loader, epoch)
        out.append([(images.clone(), labels.clone()) for images, labels in loader])
    return out


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
                                    for ea, eb in zip(a, b) for x, y in zip(ea, eb))


def test_batches_do_not_depend_on_workers_or_their_persistence():
    split = tiny_split(n=12, size=16)
    augment = build_augment({"ColorJitter": {"contrast": 0.9}})

    def loader(**settings):
        return make_loader(ImageArrayDataset(split, augment), 4, shuffle=True, seed=5,
                           settings=LoaderSettings(**settings))

    reference = batches(loader())
    assert same(batches(loader(workers=2)), reference)
    assert same(batches(loader(workers=2, persistent_workers=True)), reference)  # sees epoch 2 without restart
    assert not same(reference[:1], reference[1:])


def test_ddp_ranks_share_out_exactly_the_one_process_batches():
    """Rank batches of 4 side by side are the 1-process batch of 8: with SyncBatchNorm
    and averaged gradients, 2 processes train like one at twice the batch."""
    n = 20
    sampler = EpochSampler(n, shuffle=True, seed=1)
    ranks = [EpochSampler(n, shuffle=True, seed=1, rank=r, world_size=2) for r in (0, 1)]
    for s in (sampler, *ranks):
        s.set_epoch(3)
    one = [i for _, i in sampler]
    r0, r1 = ([i for _, i in r] for r in ranks)
    assert len(r0) == len(r1) == 10 and sorted(r0 + r1) == list(range(n))
    for b in range(0, 10, 4):
        assert sorted(r0[b:b + 4] + r1[b:b + 4]) == sorted(one[2 * b:2 * b + 8])
    odd = [list(EpochSampler(5, shuffle=False, seed=0, rank=r, world_size=2)) for r in (0, 1)]
    assert odd == [[(0, 0), (0, 2), (0, 4)], [(0, 1), (0, 3), (0, 0)]]  # padded to equal length


def test_l2_penalty_matches_a_hand_computation():
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
        model.bias.copy_(torch.tensor([3.0]))
    # 0.5 * 0.001 * (1 + 4 + 9)
    assert l2_penalty(model, 0.001).item() == pytest.approx(0.007)


def test_study_loss_is_cross_entropy_plus_the_penalty():
    model = nn.Linear(2, 2)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([0, 0])
    ce = -(torch.log_softmax(logits, 1)[[0, 1], [0, 0]]).mean()
    squares = sum((p ** 2).sum() for p in model.parameters())
    assert StudyLoss(model, 0.0)(logits, target).item() == pytest.approx(ce.item())
    assert StudyLoss(model, 0.01)(logits, target).item() == pytest.approx(ce.item() + 0.005 * squares.item())


def test_an_epoch_reports_the_cross_entropy_and_the_l2_penalty_apart():
    """train/loss must compare across variants: the penalty (about 13 here) is its own number."""
    split = tiny_split(n=8, size=32)
    cfg = load_params(ROOT / "params.yaml").variant("regu_penalty")
    stats = {}
    for lam in (0.0, cfg.l2_penalty):
        torch.manual_seed(0)
        model = build_model("resnet18", 2)
        penalty = l2_penalty(model, lam).item()
        loader = make_loaders(cfg, Splits(split, split, split), CPU, 0, LoaderSettings())[0]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights, hence the penalty, stay put
        stats[lam] = train_one_epoch(model, loader, optimizer, StudyLoss(model, lam), CPU, MEAN, STD, 2)
    plain, penalised = stats[0.0], stats[cfg.l2_penalty]
    assert "l2_penalty" not in plain
    assert penalised["l2_penalty"] == pytest.approx(penalty) and penalty > 5
    assert penalised["loss"] == pytest.approx(plain["loss"]) and penalised["loss"] < 2


def test_checkpoint_round_trip_loads_safely(tmp_path):
    model = build_model("resnet18", 2, dropout=0.5).eval()
    meta = checkpoint_meta("resnet18", 0.5, ["Healthy", "TB"], 32, MEAN, STD, variant="dropout")
    save_checkpoint(tmp_path / "best.pt", model, meta, epoch=3)
    ckpt = load_checkpoint(tmp_path / "best.pt")
    assert (ckpt["arch"], ckpt["classes"], ckpt["image_size"], ckpt["epoch"]) == ("resnet18", ["Healthy", "TB"], 32, 3)
    again = model_from_checkpoint(ckpt).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # no temporary left


def test_foreign_or_mismatched_checkpoints_are_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a checkpoint written by this pipeline"):
        load_checkpoint(tmp_path / "other.pt")
    model = build_model("resnet18", 2)
    save_checkpoint(tmp_path / "r18.pt", model, checkpoint_meta("resnet18", 0.0, ["A", "B"], 32, MEAN, STD))
    ckpt = load_checkpoint(tmp_path / "r18.pt")
    ckpt["arch"] = "resnet34"
    with pytest.raises(UserError, match="do not fit a resnet34"):
        model_from_checkpoint(ckpt, "r18.pt")
