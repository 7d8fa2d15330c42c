"""What a bench run leaves to read: the table, the targets verdict, the JSON and the PNG plot.

    lite-sft bench exports/demo --quick --out bench-results     # prints the table, writes serve-*.json/png
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from lite_sft.taskspec import TASKS


def scores(report: dict) -> bool:
    """Whether the report measured a classifier (forward passes) rather than generation (a report without a
    task is a causal LM's, from before bench measured classifiers)."""
    return not TASKS[report.get("task", "causal-lm")].generates


def targets(report: dict) -> list[dict]:
    """The issue's targets on decode tokens/s (p50) at batch 1, for every (prompt, output) shape measured:
    met only where met at all of them. fp16 on a GPU; fp32 and int8 on CPU."""
    if scores(report):
        return []  # the targets are on decode speed; an encoder classifier has none
    gpu = report["device"]["type"] == "cuda"
    rate = {}
    for b in report["backends"]:
        for r in b.get("rows", []):
            if r.get("batch") == 1 and "skip" not in r:
                rate.setdefault(b["backend"], {})[(r["prompt_len"], r["output_len"])] = r["decode_tok_s"]["p50"]
    base = rate.get("torch-merged", {})
    goals = [("onnx-fp16", 3.0, "PyTorch eager bf16")] if gpu else [("onnx-fp32", 2.0, "PyTorch eager fp32"),
                                                                    ("onnx-int8", 3.0, "PyTorch eager fp32")]
    out = []
    for name, need, against in goals:
        shapes = sorted(set(rate.get(name, {})) & set(base))
        if not shapes:
            out.append({"backend": name, "target_x": need, "against": against, "met": None, "why": "not measured"})
            continue
        speedups = {f"{p}+{o}": rate[name][(p, o)] / base[(p, o)] for p, o in shapes}
        # The most any backend reading these weights could reach: its bandwidth bound over the baseline's rate.
        roof = next(b["roofline_tok_s"] for b in report["backends"] if b["backend"] == name)
        ceiling = {f"{p}+{o}": roof / base[(p, o)] for p, o in shapes}
        out.append({"backend": name, "target_x": need, "against": f"torch-merged ({against})",
                    "speedup_by_prompt+output": speedups, "bandwidth_ceiling_x": ceiling,
                    "met": min(speedups.values()) >= need})
    return out


def format_encoder_table(report: dict) -> str:
    """An encoder classifier's rows: latency per batch and sequences/s, and each against torch-merged's."""
    head = (f"{'backend':<14} {'precision':<10} {'batch':>5} {'seq':>6} {'ms p50':>8} {'p95':>8} {'p99':>8} "
            f"{'seq/s':>9} {'x torch':>7} {'peak MiB':>8}")
    lines = [f"{report['device']['type']} ({report['device']['processor']}, {report['device']['threads']} threads); "
             f"{report['task']}: one forward pass per batch", head]
    torch_rate = {(r["batch"], r["seq_len"]): r["seq_s"]["p50"] for b in report["backends"]
                  if b["backend"] == "torch-merged" for r in b.get("rows", []) if "skip" not in r}
    for b in report["backends"]:
        if "skip" in b:
            lines.append(f"{b['backend']:<14} skipped: {b['skip']}")
            continue
        peak = b.get("peak_rss_bytes", b.get("peak_gpu_allocated_bytes", 0)) / 2**20
        for r in b["rows"]:
            start = f"{b['backend']:<14} {b['precision'][:10]:<10} {r['batch']:>5} {r['seq_len']:>6}"
            if "skip" in r:
                lines.append(f"{start} skipped: {r['skip']}")
                continue
            base = torch_rate.get((r["batch"], r["seq_len"]))
            speedup = f"{r['seq_s']['p50'] / base:>7.2f}" if base else f"{'-':>7}"
            ms = r["latency_ms"]
            lines.append(f"{start} {ms['p50']:>8.2f} {ms['p95']:>8.2f} {ms['p99']:>8.2f} {r['seq_s']['p50']:>9.1f} "
                         f"{speedup} {peak:>8.0f}")
    return "\n".join(lines)


def format_table(report: dict) -> str:
    if scores(report):
        return format_encoder_table(report)
    head = (f"{'backend':<14} {'precision':<10} {'batch':>5} {'prompt':>6} {'output':>6} {'TTFT ms':>8} "
            f"{'TPOT ms':>8} {'ITL p95':>8} {'e2e ms':>8} {'decode/s':>9} {'p95':>8} {'tok/s':>8} {'roof %':>6} "
            f"{'peak MiB':>8}")
    lines = [f"{report['device']['type']} ({report['device']['processor']}, {report['device']['threads']} threads); "
             f"copy bandwidth {report['copy_bandwidth_bytes_s'] / 1e9:.1f} GB/s; p50 unless marked", head]
    for b in report["backends"]:
        if "skip" in b:
            lines.append(f"{b['backend']:<14} skipped: {b['skip']}")
            continue
        peak = b.get("peak_rss_bytes", b.get("peak_gpu_allocated_bytes", 0)) / 2**20
        for r in b["rows"]:
            if "skip" in r:
                lines.append(f"{b['backend']:<14} {b['precision']:<10} {r['batch']:>5} {r['prompt_len']:>6} "
                             f"{r['output_len']:>6} skipped: {r['skip']}")
                continue
            roof = 100 * r["decode_tok_s"]["p50"] / r["batch"] / b["roofline_tok_s"]
            lines.append(f"{b['backend']:<14} {b['precision'][:10]:<10} {r['batch']:>5} {r['prompt_len']:>6} "
                         f"{r['output_len']:>6} {r['ttft_ms']['p50']:>8.2f} {r['tpot_ms']['p50']:>8.2f} "
                         f"{r['itl_ms']['p95']:>8.2f} {r['e2e_ms']['p50']:>8.1f} {r['decode_tok_s']['p50']:>9.1f} "
                         f"{r['decode_tok_s']['p95']:>8.1f} {r['tok_s']['p50']:>8.1f} {roof:>6.1f} {peak:>8.0f}")
    for t in report["targets"]:
        if t["met"] is None:
            lines.append(f"target {t['backend']} >= {t['target_x']:g}x {t['against']}: not measured")
        else:
            got = ", ".join(f"{k}: {v:.2f}x" for k, v in t["speedup_by_prompt+output"].items())
            ceiling = min(t["bandwidth_ceiling_x"].values())
            lines.append(f"target {t['backend']} >= {t['target_x']:g}x {t['against']} decode tokens/s at batch 1: "
                         f"{got} -> {'met' if t['met'] else 'NOT met'} (bandwidth bound: {ceiling:.1f}x at most)")
    return "\n".join(lines)


def plot(report: dict, out: Path) -> Path:
    """Decode tokens/s and TTFT per backend, one bar group per (batch, prompt, output) shape; an encoder's
    sequences/s and latency per (batch, sequence length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encoder = scores(report)
    keys = ("batch", "seq_len") if encoder else ("batch", "prompt_len", "output_len")
    metrics = (("seq_s", "sequences/s (p50, higher is better)"), ("latency_ms", "latency per batch, ms (p50)")) \
        if encoder else (("decode_tok_s", "decode tokens/s (p50, higher is better)"),
                         ("ttft_ms", "time to first token, ms (p50)"))
    measured = [b for b in report["backends"] if "rows" in b]
    shapes = sorted({tuple(r[k] for k in keys) for b in measured for r in b["rows"] if "skip" not in r})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(measured), 1)
    for k, b in enumerate(measured):
        by_shape = {tuple(r[key] for key in keys): r for r in b["rows"] if "skip" not in r}
        xs = [i + k * width for i, s in enumerate(shapes) if s in by_shape]
        for ax, (metric, _) in zip(axes, metrics):
            ax.bar(xs, [by_shape[s][metric]["p50"] for s in shapes if s in by_shape], width, label=b["backend"])
    for ax, (_, title) in zip(axes, metrics):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
        ax.set_xticklabels([" ".join(f"{p}{v}" for p, v in zip("bpo" if not encoder else "bs", s)) for s in shapes],
                           rotation=20)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"lite-sft bench: {report['path']} on {report['device']['type']}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def save(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """serve-<UTC time>.json and .png in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"serve-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
    path = stem.with_suffix(".json")
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path, plot(report, stem.with_suffix(".png"))
