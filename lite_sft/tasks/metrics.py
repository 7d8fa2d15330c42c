"""The figures people report for each task: classification, entity-level NER, BLEU and ROUGE.

    classification_metrics([0, 1, 1], [0, 1, 0], ["neg", "pos"])   # accuracy, macro_f1, per_class, confusion_matrix
    entity_metrics([["B-PER", "I-PER", "O"]], [["B-PER", "O", "O"]])  # precision, recall, f1 (micro), per_type
    bleu(["the cat sat"], ["the cat sat"])                           # sacrebleu corpus BLEU, 0-100, and its signature
    rouge(["the cat"], ["the cat sat"])                              # rouge-score ROUGE-1/2/L F-measure, 0-1

Each keeps its library's scale: BLEU 0-100 as sacrebleu prints it, everything else 0-1.

Which libraries, and why:
  * BLEU is sacrebleu's corpus BLEU (one score over the whole corpus, not a mean of sentence scores),
    reported with its signature (tokenizer, smoothing, version) so scores can be compared.
  * ROUGE is Google's rouge-score, the implementation behind the published summarisation figures;
    the corpus score is the mean of the per-example F-measures (deterministic, unlike a bootstrap).
  * Entity-level precision/recall/F1 are computed here, reading entities with conlleval's rules
    (iob.entities) as seqeval does by default. seqeval itself is not a dependency: its last release
    (1.2.2, 2020) is a source distribution that needs scikit-learn, which brings scipy: about 190 MB
    installed for what is a count of matching (sentence, type, start, end) entities. The tests check
    this module against numbers seqeval 1.2.2 gives on the same tags.
  * Classification metrics are ratios over a confusion matrix, written here for the same reason and
    with scikit-learn's conventions: a 0/0 precision or recall counts as 0, and macro-F1 averages the
    classes that occur in the references or the predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lite_sft.tasks.iob import entities


def classification_metrics(references: Sequence[int], predictions: Sequence[int],
                           labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    `labels[i]` names id i (LabelMap.names). confusion_matrix[t][p] counts examples of true class t
    predicted as p, rows and columns in the order of `labels`.
    """
    _check_lengths(references, predictions, "references", "predictions")
    n = len(labels)
    for kind, ids in (("reference", references), ("prediction", predictions)):
        bad = next((i for i in ids if not 0 <= i < n), None)
        if bad is not None:
            raise ValueError(f"{kind} id {bad} is not one of the {n} labels ({', '.join(labels)})")
    matrix = [[0] * n for _ in range(n)]  # (true, predicted)
    for true, predicted in zip(references, predictions):
        matrix[true][predicted] += 1
    per_class, occurring = {}, []
    for i, name in enumerate(labels):
        support, predicted = sum(matrix[i]), sum(row[i] for row in matrix)
        per_class[name] = _scores(matrix[i][i], predicted, support)
        if support or predicted:
            occurring.append(per_class[name]["f1"])
    return {"accuracy": sum(matrix[i][i] for i in range(n)) / len(references),
            "macro_f1": sum(occurring) / len(occurring),
            "per_class": per_class,
            "labels": list(labels),
            "confusion_matrix": matrix}


def entity_metrics(references: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Entity-level precision, recall and F1 under conlleval's rules: micro over all entities, and per type.

    One list of tags per sentence. An entity counts as found only if its type, first and last token
    all match. Types appear in `per_type` in sorted order, with their support (reference entities).
    """
    _check_lengths(references, predictions, "reference sentences", "predicted sentences")
    true, found = set(), set()
    for s, (ref, pred) in enumerate(zip(references, predictions)):
        if len(ref) != len(pred):
            raise ValueError(f"sentence {s}: {len(ref)} reference tags but {len(pred)} predicted tags")
        true.update((s, *entity) for entity in entities(ref))
        found.update((s, *entity) for entity in entities(pred))
    per_type = {}
    for kind in sorted({e[1] for e in true | found}):
        true_k, found_k = {e for e in true if e[1] == kind}, {e for e in found if e[1] == kind}
        per_type[kind] = _scores(len(true_k & found_k), len(found_k), len(true_k))
    overall = _scores(len(true & found), len(found), len(true))
    return {"precision": overall["precision"], "recall": overall["recall"], "f1": overall["f1"],
            "per_type": per_type, "true_entities": len(true), "predicted_entities": len(found)}


def bleu(hypotheses: Sequence[str], references: Sequence[str], tokenize: str = "13a") -> dict[str, Any]:
    """sacrebleu's corpus BLEU (0-100) with one reference per hypothesis.

    `tokenize` is sacrebleu's tokenizer: 13a (WMT's default), or zh, ja-mecab, ko-mecab, char, intl, ...
    for languages whose words are not separated by spaces.
    """
    from sacrebleu.metrics import BLEU  # here, so classification and NER do not pay for the import

    _check_lengths(hypotheses, references, "hypotheses", "references")
    metric = BLEU(tokenize=tokenize)
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return {"bleu": score.score, "precisions": list(score.precisions), "brevity_penalty": score.bp,
            "hypothesis_length": score.sys_len, "reference_length": score.ref_len,
            "signature": str(metric.get_signature())}


def rouge(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = False,
          tokenize: Callable[[str], list[str]] | None = None) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measure (0-1) over the examples, one reference each.

    rouge-score's default tokenizer lowercases and keeps only [a-z0-9] runs, so text in other
    scripts scores 0: pass `tokenize` (str -> tokens), e.g. str.split for pre-segmented text.
    `use_stemmer` applies the Porter stemmer to the default tokenizer's words, as many summarisation papers do.
    """
    from rouge_score import rouge_scorer  # imports nltk: only when ROUGE is asked for

    _check_lengths(predictions, references, "predictions", "references")
    if use_stemmer and tokenize is not None:
        raise ValueError("use_stemmer applies to rouge-score's default tokenizer only; stem inside `tokenize`")
    names = ("rouge1", "rouge2", "rougeL")
    tokenizer = None if tokenize is None else _Tokenizer(tokenize)
    scorer = rouge_scorer.RougeScorer(list(names), use_stemmer=use_stemmer, tokenizer=tokenizer)
    totals = dict.fromkeys(names, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)  # rouge-score takes (target, prediction)
        for name in names:
            totals[name] += scores[name].fmeasure
    return {name: total / len(predictions) for name, total in totals.items()}


class _Tokenizer:
    """rouge-score wants an object with .tokenize(text)."""

    def __init__(self, tokenize: Callable[[str], list[str]]):
        self.tokenize = tokenize


def _scores(correct: int, predicted: int, support: int) -> dict[str, Any]:
    # 0/0 is 0, as conlleval, seqeval and scikit-learn (zero_division="warn") all report it.
    precision = correct / predicted if predicted else 0.0
    recall = correct / support if support else 0.0
    f1 = 2 * correct / (predicted + support) if predicted + support else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def _check_lengths(a: Sequence, b: Sequence, a_name: str, b_name: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} {a_name} but {len(b)} {b_name}; give one of each per example")
    if not a:
        raise ValueError(f"no {a_name}: a metric over nothing is undefined")
