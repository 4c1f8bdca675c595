#!/usr/bin/env python3
"""Prints what TensorBoard's own reader (EventAccumulator) finds in an event folder, as JSON:
{"scalars": {tag: [[step, value], ...]}, "text": {tag: [[step, text], ...]}}. Used by
tests/suite/tensorboard.rs; run with the python that `scripts/fetch-assets.sh tensorboard` prints."""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "tensors": 0})
acc.Reload()
tags = acc.Tags()
out = {
    "scalars": {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]},
    "text": {
        t: [[e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode()] for e in acc.Tensors(t)]
        for t in tags["tensors"]
    },
}
print(json.dumps(out))
