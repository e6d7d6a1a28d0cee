"""The export stage's ONNX files (docs/sharing.md): onnxruntime scores images within 1e-4 of PyTorch fp32,
any batch size, decides as the contract says; `cxr-predict --onnx` uses them; bad files are one line.

The exported files are those the README quick start made (`reproduced`): nothing is exported again."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from cxrlab.errors import UserError
from tests.conftest import MINI, ROOT

TOLERANCE = 1e-4  # the bound on |p_onnx - p_torch|


def scored(project, monkeypatch, images):
    """(onnxruntime, PyTorch) probabilities of the baseline's seed 42 on uint8 images, and the two predictors."""
    from cxrlab.serving.onnx import load_onnx_predictor
    from cxrlab.serving.predict import variant_predictor

    monkeypatch.chdir(project)
    onnx = load_onnx_predictor(project / "exports/baseline/seed_42.onnx")
    torch_model = variant_predictor("baseline", 42, "best", "cpu")
    return onnx.probabilities(images), torch_model.probabilities(images), onnx, torch_model


def demo_images(project, size):
    from cxrlab.serving.predict import decode_all, image_files

    images, kept, _ = decode_all(image_files([str(project / "data/dataset")]), size, 50_000_000, 32)
    return images, kept


def decode_one(path, size):
    from cxrlab.serving.predict import decode

    return decode(path, size, 50_000_000, 32)[None]


def test_onnx_matches_pytorch_on_the_demo_images(reproduced, monkeypatch):
    project, _ = reproduced
    spec = json.loads((project / "exports/baseline/seed_42.json").read_text())
    images, kept = demo_images(project, spec["image_size"])
    assert len(kept) == 120
    p_onnx, p_torch, onnx, torch_model = scored(project, monkeypatch, images)
    assert p_onnx.dtype == np.float32 and p_onnx.shape == (120, 2)
    diff = float(np.abs(p_onnx - p_torch).max())
    print(f"max |p_onnx - p_torch| over {len(kept)} demo images: {diff:.2e}")
    assert diff < TOLERANCE
    assert np.allclose(p_onnx.sum(1), 1, atol=1e-5)  # probabilities, not logits
    # the dynamic batch axis: one image at a time gives the same
    singles = np.concatenate([onnx.probabilities(images[i:i + 1]) for i in range(5)])
    assert np.abs(singles - p_onnx[:5]).max() < 1e-6

    # the contract: what evaluate and the checkpoint say
    params = yaml.safe_load((project / "params.yaml").read_text())
    report = json.loads((project / "metrics/evaluate/baseline/report.json").read_text())
    threshold = ((report["best"].get("operating_point") or {}).get("thresholds") or {}).get("seed_42")
    assert spec["threshold"] == threshold and spec["opset"] == params["export"]["opset"]
    assert spec["classes"] == torch_model.classes and spec["positive_class"] == params["data"]["positive_class"]
    assert spec["mean"] == list(torch_model.ckpt["mean"]) and spec["std"] == list(torch_model.ckpt["std"])
    assert spec["checkpoints"] == ["models/baseline/seed_42/best.pt"]
    assert onnx.decisions(p_onnx) == torch_model.decisions(p_torch)
    import onnx as onnx_lib

    model = onnx_lib.load(str(project / "exports/baseline/seed_42.onnx"))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [spec["opset"]]
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch" and not batch.HasField("dim_value")
    # every variant exported, and exporting trained nothing: the stage only reads models/
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["export"]["do"]
    assert not any(str(o).startswith("models") for o in stages["outs"])
    for variant in params["experiments"]:
        assert (project / "exports" / variant / "seed_42.onnx").is_file(), variant


@pytest.mark.skipif(not MINI.is_dir(), reason="../shared/data/tb-cxr-mini is not present")
def test_onnx_matches_pytorch_on_real_chest_xrays(reproduced, monkeypatch):
    """The same on the 120 real X-rays of tb-cxr-mini (the quick start's model: only the numbers matter)."""
    from cxrlab.serving.predict import decode_all, image_files

    project, _ = reproduced
    size = json.loads((project / "exports/baseline/seed_42.json").read_text())["image_size"]
    images, kept, _ = decode_all(image_files([str(MINI)]), size, 50_000_000, 32)
    p_onnx, p_torch, _, _ = scored(project, monkeypatch, images)
    diff = float(np.abs(p_onnx - p_torch).max())
    print(f"max |p_onnx - p_torch| over {len(kept)} tb-cxr-mini images: {diff:.2e}")
    assert len(kept) == 120 and diff < TOLERANCE


def test_predict_scores_an_onnx_file_as_its_contract_says(reproduced, monkeypatch, tmp_path, capsys):
    from cxrlab.cli import predict

    project, _ = reproduced
    monkeypatch.chdir(project)
    folder = project / "data/dataset/test"
    predict.main(["--onnx", "exports/baseline/seed_42.onnx", str(folder), "--out", str(tmp_path / "o.json")])
    predict.main(["--variant", "baseline", str(folder), "--out", str(tmp_path / "t.json")])
    assert "ONNX opset" in capsys.readouterr().out
    ours, theirs = (json.loads((tmp_path / n).read_text()) for n in ("o.json", "t.json"))
    assert ours["threshold"] == theirs["threshold"] and ours["classes"] == theirs["classes"]
    assert [r["file"] for r in ours["predictions"]] == [r["file"] for r in theirs["predictions"]]
    assert len(ours["predictions"]) == 24
    for a, b in zip(ours["predictions"], theirs["predictions"]):
        assert max(abs(a["probabilities"][c] - b["probabilities"][c]) for c in ours["classes"]) < TOLERANCE
        assert a["decision"] == b["decision"]


def test_bad_onnx_inputs_are_one_line(tmp_path):
    from cxrlab.serving.onnx import load_onnx_predictor

    with pytest.raises(UserError, match="does not exist"):
        load_onnx_predictor(tmp_path / "missing.onnx")
    model = tmp_path / "model.onnx"
    model.write_bytes(b"\x00not a model" * 10)
    with pytest.raises(UserError, match="has no contract .*model.json beside it"):
        load_onnx_predictor(model)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(UserError, match="model.json is not valid JSON"):
        load_onnx_predictor(model)
    (tmp_path / "model.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(UserError, match="not a contract written by the export stage"):
        load_onnx_predictor(model)
    (tmp_path / "model.json").write_text(json.dumps({"format": "cxrlab-onnx-1"}))
    pytest.importorskip("onnxruntime")
    with pytest.raises(UserError, match="model.onnx is not a loadable ONNX model"):
        load_onnx_predictor(model)


def test_the_documented_snippet_scores_without_this_package(reproduced, monkeypatch):
    """docs/sharing.md's onnxruntime snippet, as written, on a demo image: PyTorch's probabilities and
    the prediction command's decision."""
    import re

    from cxrlab.serving.predict import variant_predictor

    project, _ = reproduced
    text = (ROOT / "docs/sharing.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    image = next((project / "data/dataset/test/TB").iterdir())
    monkeypatch.chdir(project)
    scope: dict = {}
    exec(snippet.replace('"scan.png"', repr(str(image))), scope)  # the docs' own code
    predictor = variant_predictor("baseline", 42, "best", "cpu")
    expected = predictor.probabilities(decode_one(image, scope["size"]))
    assert np.abs(scope["p"] - expected[0]).max() < TOLERANCE
    assert scope["decision"] == predictor.decisions(expected)[0]
