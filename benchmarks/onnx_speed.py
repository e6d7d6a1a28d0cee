"""ONNX (onnxruntime) against PyTorch float32 on the CPU: ResNet-50 at 224 px, a batch of 32, the same threads.

    OMP_NUM_THREADS=2 python -m benchmarks.onnx_speed

Random weights (speed does not depend on them); best of three after a warm-up.
"""

import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from cxrlab.model.backbones import build_model
from cxrlab.serving.export import Scorer, export_onnx

torch.manual_seed(0)
model = build_model("resnet50", 2, image_size=224).eval()
mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
path = Path(tempfile.mkdtemp()) / "r50.onnx"
export_onnx([model], mean, std, 224, path, 17)
x = np.random.default_rng(0).integers(0, 256, (32, 3, 224, 224)).astype(np.float32)
opts = ort.SessionOptions()
opts.intra_op_num_threads = torch.get_num_threads()
sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
scorer = Scorer([model], mean, std).eval()


def best(f, n=3):
    f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


with torch.no_grad():
    t_torch = best(lambda: scorer(torch.from_numpy(x)))
    p_torch = scorer(torch.from_numpy(x)).numpy()
t_onnx = best(lambda: sess.run(None, {"image": x}))
p_onnx = sess.run(None, {"image": x})[0]
print(f"ResNet-50, 224 px, 32 images, {torch.get_num_threads()} threads: PyTorch {t_torch:.2f} s, "
      f"onnxruntime {t_onnx:.2f} s ({t_torch / t_onnx:.2f}x); max |dp| {np.abs(p_onnx - p_torch).max():.1e}")
