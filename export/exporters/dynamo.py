"""torch.onnx's dynamo exporter as the three torch exporters call it (torch_decoder, torch_encoder, torch_seq2seq).

    program = dynamo_export(module, args, input_names=[...], output_names=[...], dynamic_shapes=...)
    program.save(path)

Not an exporter row itself: no task exports through it directly.
"""

from __future__ import annotations

import logging
import warnings

import torch


def dynamo_export(module, args, **options):
    """`torch.onnx.export(module, args, dynamo=True, **options)` under no_grad, without what it writes for every
    model: a log line per torchvision op it cannot register, and the modelling code's Future/Deprecation warnings."""
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", (FutureWarning, UserWarning, DeprecationWarning))
            return torch.onnx.export(module, args, dynamo=True, verbose=False, **options)
    finally:
        quiet.setLevel(level)
