"""The prediction command: evaluate's numbers for the same images, any image kind, clear errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from cxrlab.cli.predict import main
from cxrlab.errors import UserError
from tests.conftest import MINI, stage


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predictions_match_evaluate(trained_project):
    """The test images, read from their files, get evaluate's probabilities and decisions (in fp32, as evaluate)."""
    result = stage("predict", "--variant", "baseline", "--precision", "fp32", "data/dataset/test",
                   "--out", "preds.csv", cwd=trained_project, check=True)
    assert "deciding by p(TB) >=" in result.stdout and "operating threshold" in result.stdout
    mine = {r["file"].rsplit("/", 1)[-1]: r for r in read_csv(trained_project / "preds.csv")}
    evaluated = read_csv(trained_project / "metrics/evaluate/baseline/predictions.csv")
    assert len(mine) == len(evaluated) == 8
    for row in evaluated:
        p = mine[row["filename"]]
        for cls in ("Healthy", "TB"):
            assert float(p[f"prob_{cls}"]) == pytest.approx(float(row[f"best_prob_{cls}"]), abs=2e-6)
        assert float(p["prob_Healthy"]) + float(p["prob_TB"]) == pytest.approx(1, abs=2e-6)
        assert p["predicted"] == row["best_predicted"]
        assert p["threshold"] == row["best_threshold"] and p["decision"] == row["best_decision"]
        assert p["precision"] == "fp32"


def test_grayscale_16_bit_and_rgb_agree_and_bad_files_are_skipped(trained_project, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(trained_project)
    gray = np.asarray(Image.open(next((trained_project / "data/dataset/test/TB").iterdir())).convert("L"))
    folder = tmp_path / "xrays"
    folder.mkdir()
    Image.fromarray(gray, mode="L").save(folder / "gray8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(folder / "gray16.png")  # full 16-bit range
    Image.fromarray(np.repeat(gray[..., None], 3, axis=2), mode="RGB").save(folder / "rgb.png")
    (folder / "notes.png").write_text("not an image")
    truncated = (folder / "gray8.png").read_bytes()
    (folder / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    out = tmp_path / "preds.json"

    main(["--checkpoint", "models/baseline/seed_42/last.pt", str(folder), "--out", str(out)])

    report = json.loads(out.read_text())
    assert report["threshold"] is None and report["rule"] == "the highest probability"
    probs = {p["file"].rsplit("/", 1)[-1]: p["probabilities"] for p in report["predictions"]}
    assert set(probs) == {"gray8.png", "gray16.png", "rgb.png"}
    for name in ("gray16.png", "rgb.png"):
        assert probs[name] == pytest.approx(probs["gray8.png"], abs=1e-6)
    assert sum(probs["gray8.png"].values()) == pytest.approx(1, abs=1e-6)
    assert {s["file"].rsplit("/", 1)[-1] for s in report["skipped"]} == {"notes.png", "truncated.png"}
    err = capsys.readouterr().err
    assert "skipped" in err and "notes.png: not a readable image" in err


def test_bf16_probabilities_are_within_0_01_of_fp32(trained_project, tmp_path, monkeypatch, capsys):
    """`--precision bf16` (what `runtime.inference_precision: auto` picks on a CPU with native bf16; emulated,
    so the same numbers, elsewhere) on real X-rays (tb-cxr-mini, else the fixture's test images)."""
    monkeypatch.chdir(trained_project)
    images = MINI if MINI.is_dir() else trained_project / "data/dataset/test"
    rows = {}
    for precision in ("fp32", "bf16"):
        main(["--variant", "baseline", "--precision", precision, str(images),
              "--out", str(tmp_path / f"{precision}.csv")])
        assert f"images in {precision}, deciding by" in capsys.readouterr().out
        rows[precision] = read_csv(tmp_path / f"{precision}.csv")
        assert {r["precision"] for r in rows[precision]} == {precision}  # which precision scored each image
    assert [r["file"] for r in rows["fp32"]] == [r["file"] for r in rows["bf16"]]
    assert len(rows["fp32"]) == (120 if MINI.is_dir() else 8)
    gaps = [abs(float(a[f"prob_{c}"]) - float(b[f"prob_{c}"]))
            for a, b in zip(rows["fp32"], rows["bf16"]) for c in ("Healthy", "TB")]
    assert 0 < max(gaps) <= 0.01, max(gaps)  # it did score in bf16, and close to fp32


@pytest.mark.parametrize("args, message", [
    (["--variant", "basline", "data/dataset/test"], "unknown variant 'basline' (did you mean 'baseline'?)"),
    (["--variant", "dropout", "data/dataset/test"], "run `dvc repro train@dropout evaluate@dropout`"),
    (["--variant", "baseline", "--seed", "7", "data/dataset/test"], "not 7; pass one of them to --seed"),
    (["--checkpoint", "nowhere.pt", "data/dataset/test"], "nowhere.pt does not exist"),
    (["--variant", "baseline", "no/such/folder"], "no/such/folder does not exist"),
    (["--variant", "baseline", "metrics/train"], "no images found in metrics/train"),
    (["--variant", "baseline", "data/dataset/test", "--out", "preds.txt"], "write .csv or .json"),
    (["--variant", "", "data/dataset/test"], "unknown variant ''; params.yaml defines experiments: baseline"),
    (["--variant", "baseline", "--device", "banana", "data/dataset/test"], "unknown device 'banana' (--device"),
])
def test_user_mistakes_name_the_fix(trained_project, monkeypatch, args, message):
    monkeypatch.chdir(trained_project)
    with pytest.raises(UserError) as err:
        main(args)
    assert message in str(err.value)
