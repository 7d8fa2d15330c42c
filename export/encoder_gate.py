"""The gates of a multi-adapter classifier export: the trunk graph fed with one adapter's bank, then that adapter's
head graph, against the run's merged classifier.

    graphs = Graphs(tmp / "onnx" / "model.onnx", {"sentiment": tmp / "heads" / "sentiment.onnx", ...})
    gate, alone = adapter_gate(graphs, sites, run, ref, checks, stage="onnx", artefact="onnx + ...",
                               precision="float32")
    mixed = mixed_check(graphs, sites, runs, refs, alones, checks, stage="onnx", artefact="onnx", precision="float32")

adapter_gate runs the trunk with the adapter's bank alone (R = its rank, a mask of ones) and its head, and judges
the logits as the single-run export judges its graph (checks.TaskChecks: parity_tasks.py's held-out examples one at
a time, then all of them as one right-padded batch, the thresholds of the task's row for the graph's precision).
mixed_check then puts every adapter's columns in one bank and runs the first examples of every adapter as one
padded batch through the trunk once, each row's mask on its own adapter's columns, then each adapter's rows
through its own head: every row must give the labels its adapter gave alone (logits within the precision's bound)
and still pass against its merged model. This is how a server runs them (the trunk once per batch, the heads per
adapter).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lite_sft.adapters import MASK_INPUT, Site

from . import parity_tasks
from .exporters.torch_encoder import Output, gate_session
from .multi_gate import MERGED, bank
from .parity import Gate, Reference, batch_check, compare

MIXED_EXAMPLES = 2  # each adapter's rows in the mixed batch: its first held-out examples


class Graphs:
    """The trunk graph and the head graphs on onnxruntime's CPU provider, as a server runs them."""

    def __init__(self, trunk: Path, heads: dict[str, Path]):
        self.trunk = gate_session(trunk)
        self.heads = {name: gate_session(path) for name, path in heads.items()}
        self.tokens = [i.name for i in self.trunk.get_inputs()
                       if i.name != MASK_INPUT and not i.name.startswith("lora.")]
        self.outputs = [o.name for o in self.trunk.get_outputs()]

    def run_trunk(self, inputs: dict, feed: dict, mask: np.ndarray) -> dict[str, np.ndarray]:
        """The trunk's outputs for the token `inputs` (torch tensors, (batch, seq)), banks `feed`, `mask`."""
        ids = inputs["input_ids"]
        tokens = {name: (inputs[name] if name in inputs else torch.zeros_like(ids)).long().numpy()
                  for name in self.tokens}  # token_type_ids: zeros where the tokenizer gives none
        values = self.trunk.run(self.outputs, {**tokens, **feed, MASK_INPUT: mask})
        return dict(zip(self.outputs, values))

    def run_head(self, name: str, trunk: dict[str, np.ndarray], inputs: dict) -> torch.Tensor:
        """Adapter `name`'s logits from the trunk's outputs for `inputs`' rows."""
        head = self.heads[name]
        given = {**trunk, **{key: value.long().numpy() for key, value in inputs.items()}}
        feed = {i.name: given[i.name] for i in head.get_inputs()}
        return torch.from_numpy(head.run(["logits"], feed)[0]).float()


class AdapterRunner:
    """One adapter alone, called as the PyTorch classifier is: `runner(**inputs).logits` (what parity_tasks runs)."""

    def __init__(self, graphs: Graphs, name: str, feed: dict, rank: int):
        self.graphs, self.name, self.feed, self.rank = graphs, name, feed, rank

    def __call__(self, **inputs: torch.Tensor) -> Output:
        mask = np.ones((inputs["input_ids"].shape[0], self.rank), np.float32)
        return Output(self.graphs.run_head(self.name, self.graphs.run_trunk(inputs, self.feed, mask), inputs))


def adapter_gate(graphs: Graphs, sites: list[Site], run, ref, checks, *, stage: str, artefact: str,
                 precision: str) -> tuple[Gate, list[torch.Tensor]]:
    """The trunk with `run`'s bank alone and its head against `ref` (its merged model's): the gate, and the logits
    alone (each example's)."""
    feed, _ = bank(sites, [run.sites], [run.rank])
    runner = AdapterRunner(graphs, run.name, feed, run.rank)
    alone = parity_tasks.ort_logits(runner, ref)
    gate = compare(ref.as_reference(), alone, stage=stage, artefact=artefact, precision=precision, reference=MERGED,
                   min_agreement=checks.opts.min_agreement, thresholds=checks.thresholds(precision))
    batch_check(gate, ref.as_reference(), parity_tasks.ort_batch_logits(runner, ref), rows=ref.batch_rows,
                input_lengths=ref.lengths(ref.batch_rows))
    gate.extra.update(adapter=run.name, task=run.task, rank=run.rank)
    return gate, alone


def mixed_check(graphs: Graphs, sites: list[Site], runs: list, refs: dict, alones: dict, checks: dict, pad_id: int, *,
                stage: str, artefact: str, precision: str) -> dict:
    """The first examples of every adapter, interleaved in one right-padded batch: the trunk once with every
    adapter's bank, each adapter's rows through its head; each row against its adapter alone (labels identical)
    and against its merged model."""
    feed, spans = bank(sites, [run.sites for run in runs], [run.rank for run in runs])
    rows = [(k, i) for i in range(MIXED_EXAMPLES) for k, run in enumerate(runs)
            if i < len(refs[run.name].inputs)]  # (adapter, example): a row of each adapter, then the next
    examples = [refs[runs[k].name].inputs[i] for k, i in rows]
    batch = _pad(examples, pad_id)
    mask = np.zeros((len(rows), spans[-1].stop), np.float32)
    for row, (k, _) in enumerate(rows):
        mask[row, spans[k]] = 1.0
    trunk = graphs.run_trunk(batch, feed, mask)
    got: list[torch.Tensor | None] = [None] * len(rows)
    for k, run in enumerate(runs):
        mine = [row for row, (j, _) in enumerate(rows) if j == k]
        logits = graphs.run_head(run.name, {name: value[mine] for name, value in trunk.items()},
                                 {name: value[mine] for name, value in batch.items()})
        for b, row in enumerate(mine):
            length = examples[row]["input_ids"].shape[1]
            got[row] = logits[b:b + 1] if logits.dim() == 2 else logits[b, :length]
    judge = dict(stage=stage, artefact=artefact, precision=precision)
    thresholds = checks[runs[0].name].thresholds(precision)  # seq-cls and token-cls share the classifier row
    expected = Reference([e["input_ids"] for e in examples], [1] * len(rows),
                         [refs[runs[k].name].logits[i] for k, i in rows])
    merged = compare(expected, got, **judge, reference="each row's merged model", thresholds=thresholds)
    # Within one engine a row's answer may not depend on its neighbours: every label as alone.
    same = compare(Reference(expected.sequences, expected.prompt_lens, [alones[runs[k].name][i] for k, i in rows]),
                   got, **judge, reference="each row's adapter alone",
                   thresholds={**thresholds, "min_agreement": 1.0})
    figures = ("max_abs_diff", "mean_abs_diff", "greedy_agreement", "positions", "ties", "passed")
    return {"stage": stage, "artefact": artefact, "precision": precision, "adapters": [run.name for run in runs],
            "rows": len(rows), "row_adapters": [runs[k].name for k, _ in rows],
            "input_lengths": [e["input_ids"].shape[1] for e in examples], "padding_side": "right",
            "vs_merged": {k: getattr(merged, k) for k in figures}, "vs_alone": {k: getattr(same, k) for k in figures},
            "passed": merged.passed and same.passed}


def _pad(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Examples' inputs (each (1, length)) right-padded into one batch: pad ids, mask 0, token type 0 (also for a
    row whose task's collate gave no token_type_ids)."""
    longest = max(e["input_ids"].shape[1] for e in examples)
    batch = {}
    for name in dict.fromkeys(name for example in examples for name in example):
        fill = pad_id if name == "input_ids" else 0
        batch[name] = torch.full((len(examples), longest), fill, dtype=torch.long)
        for row, example in enumerate(examples):
            if name in example:
                batch[name][row, :example[name].shape[1]] = example[name][0]
    return batch
