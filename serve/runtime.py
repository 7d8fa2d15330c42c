"""Load an exported model and take one greedy step: which provider it runs on, and what it answers.

    python -m lite_sft.serve.runtime exports/demo --prompt-ids 1,2,3      # which provider, and a greedy step

The backends and the folders they load are in serve/backends/ (factory.py's docstring lists the folders).
"""

from __future__ import annotations

import argparse

import numpy as np

from lite_sft.taskspec import TASKS

from .backends.devices import DEVICES
from .backends.factory import load_backend
from .backends.protocol import ScoringAdapters


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m lite_sft.serve.runtime", description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--prompt-ids", default="1,2,3")
    args = parser.parse_args()
    backend, _ = load_backend(args.folder, args.device)
    ids = np.array([[int(i) for i in args.prompt_ids.split(",")]])
    if isinstance(backend, ScoringAdapters):  # classifier adapters: each answers with its own head
        for name in backend.served_adapters():
            logits = backend.logits([{"input_ids": ids[0].tolist()}], [name])[0]
            labels = backend.adapter_labels(name)
            print(f"{name}: {[labels[i] for i in np.atleast_1d(logits.argmax(-1))]}")
        return
    if not TASKS[backend.task].generates:
        logits = backend.logits([{"input_ids": ids[0].tolist()}])[0]
        print(f"{backend.describe()}: {[backend.labels[i] for i in np.atleast_1d(logits.argmax(-1))]}")
        return
    logits, _ = backend.prefill(ids, np.ones_like(ids), ids.shape[1] + 1)
    print(f"{backend.describe()}: next token {int(logits[0].argmax())}")


if __name__ == "__main__":
    main()
