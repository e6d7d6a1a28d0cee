"""Stage `flops`: parameters and compute of each variant's model, counted by thop.

One forward pass of a single image at `data.image_size` through each
variant's model (backbone and head). thop counts multiply-accumulates
(MACs); FLOPs are reported as 2 x MACs, the usual convention, and both are
labelled. thop has no rule for `nn.MultiheadAttention` (ViT), so one is
given here: the q, k, v and output projections plus the two L x L x E
products of attention. The study quoted 3.88 G from another counter on a
slightly different ResNet.
"""

from __future__ import annotations

import thop
import torch
from torch import nn

from cxrlab import paths
from cxrlab.config.load import Params
from cxrlab.config.schema import TrainParams
from cxrlab.io.fsio import write_json
from cxrlab.io.records import split_classes
from cxrlab.model.backbones import build_model, count_parameters


def _attention_macs(module: nn.MultiheadAttention, inputs: tuple, output) -> None:
    query = inputs[0]
    tokens = query.shape[0] * query.shape[1]  # batch x sequence length (either layout)
    length, dim = query.shape[1] if module.batch_first else query.shape[0], module.embed_dim
    module.total_ops += torch.DoubleTensor([4 * tokens * dim * dim + 2 * tokens * length * dim])


def count_model(cfg: TrainParams, num_classes: int, image_size: int) -> dict:
    """Parameters, MACs and FLOPs (= 2 x MACs) of one image through the variant's model."""
    model = build_model(cfg.arch, num_classes, cfg.dropout, head_hidden=cfg.head_hidden,
                        keep_imagenet_head=cfg.keep_imagenet_head, image_size=image_size).eval()
    parameters = count_parameters(model)  # before thop adds its counting buffers
    with torch.no_grad():
        macs, _ = thop.profile(model, inputs=(torch.zeros(1, 3, image_size, image_size),), verbose=False,
                               custom_ops={nn.MultiheadAttention: _attention_macs})
    macs = int(macs)
    return {"parameters": parameters, "macs": macs, "flops": 2 * macs,
            "gmacs": round(macs / 1e9, 4), "gflops": round(2 * macs / 1e9, 4)}


def count_variants(params: Params) -> None:
    # The split's classes, not params.yaml's: `data.classes: auto` is only resolved there.
    size, k = params.data.image_size, len(split_classes(paths.TRAIN_CSV))
    report = {
        "units": (f"per image at 3x{size}x{size}, batch 1, counted by thop.profile: "
                  "macs = multiply-accumulates, flops = 2 x macs, parameters = all weights"),
        "variants": {},
    }
    cache: dict[tuple, dict] = {}
    for name, cfg in params.variants.items():
        key = (cfg.arch, cfg.dropout, tuple(cfg.head_hidden), cfg.keep_imagenet_head)
        if key not in cache:
            cache[key] = count_model(cfg, k, size)
        report["variants"][name] = {"arch": cfg.arch, **cache[key]}
        c = cache[key]
        print(f"flops {name}: {cfg.arch}, {c['parameters']:,} parameters, {c['gmacs']:.3f} GMACs "
              f"= {c['gflops']:.3f} GFLOPs per image at {size} px")
    write_json(paths.FLOPS_REPORT, report)
    # the headline for dvc exp show: two numbers a variant (counts, MACs and units stay in the report)
    write_json(paths.FLOPS, {name: {"gflops": v["gflops"], "mparams": round(v["parameters"] / 1e6, 3)}
                             for name, v in report["variants"].items()})

