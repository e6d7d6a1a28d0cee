"""An exported model (`exports/<variant>/seed_<seed>.onnx` and its contract `.json`) scored with onnxruntime.

The optional extra `pip install -e '.[onnx]'` installs onnxruntime. What a
deployment outside this package does is the same few lines (docs/sharing.md):
decode and resize as the contract says, feed float32 pixel values 0-255, read
the probabilities, decide at the contract's threshold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrlab.errors import UserError

CONTRACT_FORMAT = "cxrlab-onnx-1"  # as cxrlab.serving.export writes it
BATCH_SIZE = 32


def load_contract(model: Path) -> dict:
    """The contract beside `model` (same name, .json), checked to be one the export stage wrote."""
    spec_path = model.with_suffix(".json")
    if not model.is_file():
        raise UserError(f"{model} does not exist; export first (`dvc repro export@<variant>`), then pass "
                        "exports/<variant>/seed_<seed>.onnx")
    if not spec_path.is_file():
        raise UserError(f"{model} has no contract {spec_path} beside it: it tells the image size, "
                        "class order and threshold; use a file the export stage wrote (with its .json)")
    try:
        spec = json.loads(spec_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{spec_path} is not valid JSON ({err}); export again with `dvc repro`") from None
    if not isinstance(spec, dict) or spec.get("format") != CONTRACT_FORMAT:
        raise UserError(f"{spec_path} is not a contract written by the export stage "
                        f"(expected format {CONTRACT_FORMAT!r})")
    return spec


def session(model: Path):
    """An onnxruntime CPU session of `model`; a missing onnxruntime or a damaged file is a `UserError`."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("scoring an ONNX file needs onnxruntime: pip install -e '.[onnx]' "
                        "(or pip install onnxruntime)") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: a normal run prints no warnings
    try:
        return onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own types for unreadable or invalid models
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{model} is not a loadable ONNX model ({first}); use a file the export stage wrote") \
            from None


@dataclass
class OnnxPredictor:
    """Like `cxrlab.serving.predict.Predictor` for the prediction command, from an exported file."""

    path: Path
    spec: dict
    sess: object

    @property
    def classes(self) -> list[str]:
        return list(self.spec["classes"])

    @property
    def image_size(self) -> int:
        return int(self.spec["image_size"])

    @property
    def positive(self) -> int | None:
        pos = self.spec.get("positive_class")
        return self.classes.index(pos) if pos in self.classes else None

    @property
    def threshold(self) -> float | None:
        return self.spec.get("threshold") if self.positive is not None else None

    @property
    def summary(self) -> str:
        return f"ONNX opset {self.spec['opset']} of {self.spec['arch']}, {self.image_size} px"

    @property
    def paths(self) -> list[Path]:
        return [self.path]

    @property
    def precision(self) -> str:
        return "fp32"  # the exported graph is float32 (onnxruntime on the CPU)

    @property
    def fold_note(self) -> str | None:
        return None  # the export averages a seed's fold models in the graph, as evaluate does

    @property
    def rule(self) -> str:
        if self.threshold is None:
            return "the highest probability"
        return (f"p({self.classes[self.positive]}) >= {self.threshold:.4f} "
                "(the operating threshold chosen by evaluate, from the contract)")

    def probabilities(self, images: np.ndarray, batch_size: int = BATCH_SIZE) -> np.ndarray:
        """Class probabilities (N x k, float32) of uint8 images (N, 3, size, size)."""
        name = self.spec["input"]["name"]
        out = [self.sess.run(None, {name: np.asarray(images[i:i + batch_size], dtype=np.float32)})[0]
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), dtype=np.float32)

    def decisions(self, probs: np.ndarray) -> list[str]:
        """As evaluate decides: at the threshold on the positive class, else by argmax."""
        if self.threshold is None:
            return [self.classes[int(i)] for i in probs.argmax(1)]
        other = 1 - self.positive
        return [self.classes[self.positive] if p[self.positive] >= self.threshold else self.classes[other]
                for p in probs]


def load_onnx_predictor(model: str | Path) -> OnnxPredictor:
    model = Path(model)
    spec = load_contract(model)
    return OnnxPredictor(model, spec, session(model))
