"""Transfer learning as params: backbones and heads, ImageNet weights, freezing, schedules, imbalance."""

from __future__ import annotations

import urllib.error
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from cxrlab.data.datasets import EpochSampler, balanced_weights
from cxrlab.errors import UserError
from cxrlab.model.architectures import ARCHITECTURES
from cxrlab.model.backbones import build_model, head_name
from cxrlab.model.flops import count_model
from cxrlab.model.freezing import apply_freeze, phase_at, phases, train_mode
from cxrlab.model.losses import StudyLoss, class_weights
from cxrlab.model.optim import make_optimizer, make_scheduler, scale_lr
from tests.conftest import hub_weights_path


def spec(arch: str, **kw) -> SimpleNamespace:
    return SimpleNamespace(arch=arch, dropout=kw.get("dropout", 0.0), head_hidden=kw.get("head_hidden", []),
                           keep_imagenet_head=kw.get("keep_imagenet_head", False))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_backbone_builds_with_k_outputs_and_its_flops_count_runs(arch):
    torch.manual_seed(0)
    model = build_model(arch, 3, image_size=32).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    assert isinstance(model.get_submodule(head_name(arch)), nn.Linear)
    counted = count_model(spec(arch), 3, 32)
    assert counted["parameters"] == sum(p.numel() for p in model.parameters())
    assert counted["macs"] > counted["parameters"] // 10 and counted["flops"] == 2 * counted["macs"]


def test_vit_flops_include_attention():
    # ViT-B/16 at 224 px: torchvision's model card gives 17.56 G multiply-accumulates
    assert count_model(spec("vit_b_16"), 1000, 224)["gmacs"] == pytest.approx(17.56, rel=0.01)


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0", "vit_b_16"])
def test_mlp_head_and_stacking_on_the_imagenet_classifier(arch):
    mlp = build_model(arch, 4, dropout=0.2, head_hidden=[16, 8], image_size=32)
    layers = mlp.get_submodule(head_name(arch))
    assert [type(m) for m in layers] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert (layers[0].out_features, layers[3].out_features, layers[6].out_features) == (16, 8, 4)

    stacked = build_model(arch, 4, head_hidden=[256], keep_imagenet_head=True, image_size=32)
    imagenet, new = stacked.get_submodule(head_name(arch)).children()
    assert imagenet.out_features == 1000 and new[0].in_features == 1000 and new[-1].out_features == 4
    assert head_name(arch, keep_imagenet_head=True).endswith(".1")
    with torch.no_grad():
        assert stacked.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


def test_pretrained_weights_come_from_the_torch_hub_cache(torch_home):
    saved = torch.load(hub_weights_path(torch_home, "resnet18"), weights_only=True)
    model = build_model("resnet18", 3, pretrained=True)
    assert torch.equal(model.conv1.weight, saved["conv1.weight"])
    assert torch.equal(model.layer4[1].bn2.running_var, saved["layer4.1.bn2.running_var"])
    assert model.fc.out_features == 3  # a new head

    stacked = build_model("resnet18", 3, pretrained=True, keep_imagenet_head=True, head_hidden=[8])
    assert torch.equal(stacked.fc[0].weight, saved["fc.weight"])  # the ImageNet classifier kept


def test_pretrained_vit_is_interpolated_to_the_image_size(torch_home):
    saved = torch.load(hub_weights_path(torch_home, "vit_b_16"), weights_only=True)
    model = build_model("vit_b_16", 2, pretrained=True, image_size=32)
    assert model.encoder.pos_embedding.shape == (1, 1 + 2 * 2, 768)
    assert torch.equal(model.encoder.pos_embedding[:, 0], saved["encoder.pos_embedding"][:, 0])  # class token kept
    assert torch.equal(model.conv_proj.weight, saved["conv_proj.weight"])
    with pytest.raises(UserError, match="divisible by 16"):
        build_model("vit_b_16", 2, image_size=40)


def test_offline_without_cached_weights_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as err:
        build_model("resnet18", 2, pretrained=True)
    message = str(err.value)
    assert str(tmp_path / "empty" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "train.pretrained: false" in message


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freezing_leaves_exactly_the_expected_parameters_trainable():
    model = build_model("resnet18", 2)
    everything = {n for n, _ in model.named_parameters()}

    assert apply_freeze(model, "none", "resnet18") == sum(p.numel() for p in model.parameters())
    assert trainable(model) == everything

    n = apply_freeze(model, "head_only", "resnet18")
    assert trainable(model) == {"fc.weight", "fc.bias"} and n == 512 * 2 + 2

    apply_freeze(model, "up_to:layer3", "resnet18")
    assert trainable(model) == {n for n in everything if n.startswith(("layer4.", "fc."))}

    stacked = build_model("resnet18", 2, head_hidden=[8], keep_imagenet_head=True)
    apply_freeze(stacked, "head_only", "resnet18", keep_imagenet_head=True)
    assert trainable(stacked) == {"fc.1.0.weight", "fc.1.0.bias", "fc.1.2.weight", "fc.1.2.bias"}

    with pytest.raises(UserError, match="no module 'layer9'.*layer4"):
        apply_freeze(model, "up_to:layer9", "resnet18")


@pytest.mark.parametrize("arch, stage, first_trained", [
    ("shufflenet_v2_x0_5", "stage3", "stage4."),
    ("densenet121", "features.denseblock3", "features.transition3."),
    ("efficientnet_b0", "features.5", "features.6."),
    ("vit_b_16", "encoder.layers.encoder_layer_9", "encoder.layers.encoder_layer_10."),
])
def test_up_to_a_stage_in_every_family(arch, stage, first_trained):
    model = build_model(arch, 2, image_size=32)
    apply_freeze(model, f"up_to:{stage}", arch)
    names = [n for n, _ in model.named_parameters()]
    first = next(i for i, n in enumerate(names) if n.startswith(first_trained))
    assert trainable(model) == set(names[first:])


def test_frozen_batchnorm_stays_in_eval_mode():
    model = build_model("resnet18", 2)
    apply_freeze(model, "up_to:layer3", "resnet18")
    train_mode(model)
    assert not model.bn1.training and not model.layer3[1].bn2.training
    assert model.layer4[0].bn1.training and model.training
    x = torch.randn(4, 3, 32, 32)
    before = model.layer2[0].bn1.running_mean.clone()
    model(x)
    assert torch.equal(model.layer2[0].bn1.running_mean, before)  # frozen statistics do not move


def test_progressive_phases_change_freezing_and_scale_the_lr():
    plan = phases("none", [{"epoch": 1, "freeze": "head_only", "lr_factor": 1.0},
                           {"epoch": 3, "freeze": "up_to:layer2", "lr_factor": 0.1},
                           {"epoch": 5, "freeze": "none", "lr_factor": 0.01}])
    assert [phase_at(plan, e).freeze for e in range(1, 7)] == \
        ["head_only", "head_only", "up_to:layer2", "up_to:layer2", "none", "none"]
    assert phases("head_only", []) == [phase_at(phases("head_only", []), 9)]

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    scale_lr(opt, 0.1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def lrs(scheduler: str, epochs: int = 8, **kw) -> list[float]:
    cfg = SimpleNamespace(optimizer="sgd", lr=1.0, momentum=0.9, nesterov=True, weight_decay=0.0, epochs=epochs,
                          scheduler=scheduler, step_size=3, gamma=0.5, final_lr_fraction=0.01, warmup_epochs=2, **kw)
    opt = make_optimizer([nn.Parameter(torch.zeros(1))], cfg)
    sched = make_scheduler(opt, cfg)
    seen = []
    for _ in range(epochs):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched:
            sched.step()
    return seen


def test_each_scheduler_gives_the_expected_learning_rates():
    assert lrs("none") == [1.0] * 8
    assert lrs("step") == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25])
    assert lrs("exponential") == pytest.approx([0.5 ** e for e in range(8)])
    cosine = [0.01 + 0.99 * (1 + np.cos(np.pi * e / 7)) / 2 for e in range(8)]
    assert lrs("cosine") == pytest.approx(cosine)  # lr in epoch 1, lr x final_lr_fraction in the last
    warm = [1 / 3, 2 / 3] + [0.01 + 0.99 * (1 + np.cos(np.pi * e / 5)) / 2 for e in range(6)]
    assert lrs("warmup_cosine") == pytest.approx(warm)


def test_sgd_takes_momentum_and_nesterov():
    cfg = SimpleNamespace(optimizer="sgd", lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.0)
    group = make_optimizer([nn.Parameter(torch.zeros(1))], cfg).param_groups[0]
    assert (group["momentum"], group["nesterov"]) == (0.8, True)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_uses_torchs_fused_kernel_on_the_cpu_and_matches_the_loop(name, monkeypatch):
    """Fused (one kernel for all parameters, faster) where torch has it; the same update as torch's
    loop up to rounding, and the same bits on a rerun (the resume test's bit-equality rests on it);
    parameters unfrozen after the first steps (a progressive phase) join in."""
    from cxrlab.model import optim

    cfg = SimpleNamespace(optimizer=name, lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)

    def run() -> tuple[torch.Tensor, torch.Tensor, bool | None]:
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(300)) for _ in range(3)]
        start = torch.cat([p.detach().clone() for p in params])
        opt = make_optimizer(params, cfg)
        for step in range(4):
            for p in params[:1] if step < 2 else params:  # the others unfrozen from step 3
                p.grad = torch.randn_like(p)
            opt.step()
        return start, torch.cat([p.detach() for p in params]), opt.defaults["fused"]

    start, made, fused = run()
    assert fused is True
    assert (made - start).abs().min() > 0  # every parameter moved
    assert torch.equal(made, run()[1])
    monkeypatch.setattr(optim, "fusable", lambda params: None)  # torch's default: the foreach loop
    _, loop, fused = run()
    assert not fused
    assert torch.allclose(made, loop, rtol=0, atol=1e-6)


def test_sgd_with_momentum_takes_parameters_unfrozen_later():
    """A progressive phase unfreezes parameters after the first steps: some then have a momentum buffer
    and others not yet, which torch's fused SGD kernel cannot take (so SGD is not fused)."""
    cfg = SimpleNamespace(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.0)
    head, backbone = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = make_optimizer([head, backbone], cfg)
    head.grad = torch.ones(2)
    opt.step()
    head.grad, backbone.grad = torch.ones(2), torch.ones(2)
    opt.step()
    assert head.tolist() == pytest.approx([-0.1 - 0.19] * 2)  # momentum: 0.1, then 0.1 * (0.9 + 1)
    assert backbone.tolist() == pytest.approx([-0.1] * 2)


def test_class_weighted_loss_matches_a_hand_computation():
    labels = np.array([0] * 6 + [1] * 2)
    weights = class_weights("inverse_frequency", labels, ["Healthy", "TB"])
    assert weights.tolist() == pytest.approx([8 / (2 * 6), 8 / (2 * 2)])
    assert class_weights({"Healthy": 1.0, "TB": 3.0}, labels, ["Healthy", "TB"]).tolist() == [1.0, 3.0]
    assert class_weights(None, labels, ["Healthy", "TB"]) is None

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    target = torch.tensor([0, 1, 1])
    loss = StudyLoss(nn.Linear(1, 1), weight=torch.tensor([1.0, 3.0]))(logits, target)
    nll = -torch.log_softmax(logits, 1)[torch.arange(3), target]
    w = torch.tensor([1.0, 3.0, 3.0])
    assert loss.item() == pytest.approx(((w * nll).sum() / w.sum()).item())

    with pytest.raises(UserError, match="none of \\['TB'\\]"):
        class_weights("inverse_frequency", np.zeros(4, dtype=int), ["Healthy", "TB"])


def test_balanced_sampler_draws_each_class_equally_often_and_reproducibly():
    labels = np.array([0] * 90 + [1] * 10)
    sampler = EpochSampler(100, shuffle=True, seed=3, weights=balanced_weights(labels))
    counts = []
    for epoch in range(1, 41):
        sampler.set_epoch(epoch)
        drawn = [i for _, i in sampler]
        assert len(drawn) == 100
        counts.append(np.mean(labels[drawn]))
    assert np.mean(counts) == pytest.approx(0.5, abs=0.03)  # vs 0.1 without balancing
    sampler.set_epoch(7)
    again = EpochSampler(100, shuffle=True, seed=3, weights=balanced_weights(labels))
    again.set_epoch(7)
    assert list(sampler) == list(again)
