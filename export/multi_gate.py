"""The gates of a multi-adapter export: the base graph fed with one adapter's bank, against that run's merged model.

    decoder = OnnxDecoder(tmp / "onnx")
    gate, alone = adapter_gate(decoder, sites, run, ref, checks, stage="onnx", artefact="onnx", precision="float32")
    mixed = mixed_check(decoder, sites, runs, refs, alones, stage="onnx", artefact="onnx", precision="float32")

adapter_gate feeds the graph the adapter's bank alone (R = its rank, a mask of ones) and judges it as the single-run
export judges its graph (parity.py: the prompts one at a time through the KV cache, then the shortest and the
longest as one padded batch, the thresholds of the graph's precision). mixed_check then feeds every adapter's
columns in one bank and runs one prompt of each adapter as one padded batch, each row's mask on its own adapter's
columns: every row must give what its adapter gave alone (the same greedy tokens, logits within the precision's
bound) and still pass against its merged model. The decoder loop is parity.py's, on ort_decoder.OnnxDecoder.
bank, check_branches_float and the OUT names (BASE_DIR, adapter_file) serve the classifiers' export too
(multi_encoder.py, encoder_gate.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from lite_sft.adapters import ADAPTER_SUFFIX, ADAPTERS_DIR, Site, input_names

from . import ExportError

from .parity import THRESHOLDS, Gate, Reference, batch_check, compare, ort_batch_logits, ort_logits
from .perplexity import perplexity

BASE_DIR = "base"  # OUT/base/: the shared base (a classifier export's: the trunk) as a Hugging Face folder
# What each graph of a multi-adapter export is judged against (parity.json's "reference").
MERGED = "merged PyTorch model (base/ + the run's adapter, merged in memory), fp32"


def adapter_file(name: str) -> str:
    """An adapter's file, relative to OUT."""
    return f"{ADAPTERS_DIR}/{name}{ADAPTER_SUFFIX}"


def bank(sites: list[Site], adapters: list[dict], ranks: list[int]) -> tuple[dict[str, np.ndarray], list[slice]]:
    """The graph's LoRA inputs for `adapters` side by side ({site: {"A", "B"}} each, of rank `ranks`), zeros where
    one trains no module at a site, and each adapter's columns."""
    spans, start = [], 0
    for rank in ranks:
        spans.append(slice(start, start + rank))
        start += rank
    feed = {}
    for site in sites:
        a_name, b_name = input_names(site.name)
        a = np.zeros((site.fan_in, start), np.float32)
        b = np.zeros((start, site.fan_out), np.float32)
        for pair, span in zip(adapters, spans):
            if site.name in pair:
                a[:, span], b[span, :] = pair[site.name]["A"], pair[site.name]["B"]
        feed[a_name], feed[b_name] = a, b
    return feed, spans


def adapter_gate(decoder, sites: list[Site], run, ref: Reference, checks, *, stage: str, artefact: str,
                 precision: str, reference: str) -> tuple[Gate, list[torch.Tensor]]:
    """The graph with `run`'s adapter alone against `ref` (its merged model's): the gate, and the logits alone."""
    feed, _ = bank(sites, [run.sites], [run.rank])
    decoder.feed_also(feed, np.ones((1, run.rank), np.float32))
    alone = ort_logits(decoder, ref)
    gate = compare(ref, alone, stage=stage, artefact=artefact, precision=precision, reference=reference,
                   min_agreement=checks.opts.min_agreement)
    batch_check(gate, ref, ort_batch_logits(decoder, ref.subset(ref.batch_rows())),
                side="right" if decoder.pad_right else "left")
    ppl = perplexity(lambda ids: decoder(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0], checks.texts)
    gate.extra.update(adapter=run.name, rank=run.rank, perplexity_reference=ref.perplexity, perplexity=ppl)
    return gate, alone


def mixed_check(decoder, sites: list[Site], runs: list, refs: list[Reference], alones: list[list[torch.Tensor]], *,
                stage: str, artefact: str, precision: str) -> dict:
    """One padded batch whose row k is adapter k's first prompt, all adapters in one bank: each row against its
    adapter alone (greedy tokens identical) and against its merged model (the precision's thresholds)."""
    feed, spans = bank(sites, [run.sites for run in runs], [run.rank for run in runs])
    mask = np.zeros((len(runs), spans[-1].stop), np.float32)
    for row, span in enumerate(spans):
        mask[row, span] = 1.0
    decoder.feed_also(feed, mask)
    rows = Reference([ref.sequences[0] for ref in refs], [ref.prompt_lens[0] for ref in refs],
                     [ref.logits[0] for ref in refs])
    got = ort_batch_logits(decoder, rows)
    judge = dict(stage=stage, artefact=artefact, precision=precision, reference="each row's merged model")
    merged = compare(rows, got, **judge)
    # Within one engine a row's answer may not depend on its neighbours: every greedy token as alone.
    same = compare(Reference(rows.sequences, rows.prompt_lens, [alone[0] for alone in alones]), got, **judge,
                   thresholds={**THRESHOLDS[precision], "min_agreement": 1.0})
    figures = ("max_abs_diff", "mean_abs_diff", "greedy_agreement", "positions", "ties", "passed")
    return {"stage": stage, "artefact": artefact, "precision": precision, "adapters": [run.name for run in runs],
            "rows": len(runs), "prompt_lengths": rows.prompt_lens,
            "padding_side": "right" if decoder.pad_right else "left",
            "vs_merged": {k: getattr(merged, k) for k in figures}, "vs_alone": {k: getattr(same, k) for k in figures},
            "passed": merged.passed and same.passed}


def summary(gate: Gate) -> dict:
    """What the manifest keeps of a gate: enough to see it passed and by what margin; parity.json has the rest."""
    batch = gate.extra.get("batch") or {}
    return {"passed": gate.passed, "precision": gate.precision, "greedy_agreement": gate.greedy_agreement,
            "max_abs_diff": gate.max_abs_diff, "mean_abs_diff": gate.mean_abs_diff,
            **({"batch_passed": batch["passed"]} if batch else {})}


def check_branches_float(model_file: Path) -> None:
    """A quantised graph's LoRA branches are still float MatMuls on the bank inputs: quantize_dynamic quantises a
    MatMul only when its weight is an initializer, and the banks are graph inputs; checked, not assumed."""
    graph = onnx.load(str(model_file), load_external_data=False).graph
    banks = {i.name for i in graph.input if i.name.startswith("lora.")}
    used = {name for node in graph.node if node.op_type == "MatMul" for name in node.input if name in banks}
    if used != banks:
        raise ExportError(f"{model_file}: the quantiser rewrote the LoRA branches of "
                          f"{', '.join(sorted(banks - used)[:3])}"
                          " (they must stay float MatMuls on the bank inputs)")
