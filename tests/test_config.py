"""params.yaml validation: every mistake named with its key and the fix."""

from __future__ import annotations

import pytest

from cxrlab.config.load import deep_merge, load_params
from cxrlab.errors import UserError
from tests.conftest import ROOT, set_params


@pytest.fixture
def params_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    return path


def error_for(params_file, changes) -> str:
    set_params(params_file, changes)
    with pytest.raises(UserError) as err:
        load_params(params_file)
    return str(err.value)


def test_the_committed_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert list(params.variants) == ["baseline", "regu_penalty", "dropout", "sharpness", "contrast"]
    assert params.data.class_names == ["Healthy", "TB"]
    base = params.variant("baseline")
    assert (base.arch, base.lr, base.weight_decay, base.batch_size, base.epochs) == ("resnet50", 1e-4, 1e-4, 4, 20)
    assert params.variant("contrast").augmentations == {"ColorJitter": {"contrast": 0.2}}


@pytest.mark.parametrize("changes, expected", [
    ({"train.learnig_rate": 0.1}, "train.learnig_rate: unknown key (did you mean 'lr'?)"),
    ({"train.learning_rate": 0.1}, "train.learning_rate: unknown key (did you mean 'lr'?)"),
    ({"data.sorce": "x"}, "data.sorce: unknown key (did you mean 'source'?)"),
    ({"train.lr": -1}, "train.lr: Input should be greater than 0 (got -1)"),
    ({"train.epochs": "ten"}, "train.epochs: Input should be a valid integer"),
    ({"data.test_fraction": 1.5}, "data.test_fraction: Input should be less than 1 (got 1.5)"),
    ({"data.test_fraction": 0}, "data.test_fraction: Input should be greater than 0"),
    ({"train.arch": "resnet500"}, "unknown architecture 'resnet500' (did you mean 'resnet50'?)"),
    ({"train.augment": {"ColourJitter": {}}}, "unknown augmentation 'ColourJitter' (did you mean 'ColorJitter'?)"),
    ({"data.positive_class": "Sick"}, "positive_class 'Sick' is not one of the classes ['Healthy', 'TB']"),
    ({"runtime.device": "gpu"}, "unknown device 'gpu'"),
    ({"runtime.inference_precision": "fp16"},
     "runtime.inference_precision: Input should be 'auto', 'fp32' or 'bf16' (got 'fp16')"),
    ({"experiments.contrast.augmnt": {}}, "experiments.contrast.augmnt: unknown key (did you mean 'augment'?)"),
    ({"experiments.dropout.dropout": 1.5}, "experiments.dropout.dropout: Input should be less than 1"),
    ({"evaluate.threshold_rule": "strict"}, "evaluate.threshold_rule: Input should be 'expected' or 'tolerance'"),
    ({"export.opset": 9}, "export.opset: Input should be greater than or equal to 13 (got 9)"),
])
def test_mistakes_name_the_key(params_file, changes, expected):
    assert expected in error_for(params_file, changes)


def test_a_missing_key_is_named(params_file):
    text = params_file.read_text().replace("  seed: 42                # draws the validation hold-out\n", "")
    params_file.write_text(text)
    with pytest.raises(UserError, match=r"data.seed: is missing"):
        load_params(params_file)


def test_all_problems_are_reported_together(params_file):
    message = error_for(params_file, {"train.lr": 0, "experiments.baseline.epochs": 0})
    assert "train.lr" in message and "experiments.baseline.epochs" in message


def test_unknown_variant(params_file):
    with pytest.raises(UserError, match=r"unknown variant 'contrst' \(did you mean 'contrast'\?\).*baseline"):
        load_params(params_file).variant("contrst")


def test_broken_yaml(params_file):
    params_file.write_text("data: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_params(params_file)


def test_variants_merge_over_train_key_by_key():
    base = {"lr": 1, "augment": {"A": {"p": 1}, "B": {"p": 2}}}
    merged = deep_merge(base, {"augment": {"B": None, "C": {}}})
    assert merged == {"lr": 1, "augment": {"A": {"p": 1}, "B": None, "C": {}}}
    assert base["augment"]["B"] == {"p": 2}  # not modified
