"""Metrics against numbers worked out by hand (the working is in the comments).

The entity-level cases were also run through seqeval 1.2.2 (default, conlleval-compatible mode),
which gives the same numbers; the classification case through scikit-learn 1.9.1.
"""

from __future__ import annotations

import math

import pytest

from lite_sft.tasks.metrics import bleu, classification_metrics, entity_metrics, rouge


def prf(precision, recall, f1, support):
    return {"precision": pytest.approx(precision), "recall": pytest.approx(recall), "f1": pytest.approx(f1),
            "support": support}


# --- classification -------------------------------------------------------------------------------

def test_classification_with_a_class_never_predicted_and_one_never_seen():
    # true   a a a b b c        confusion (rows true, columns predicted; order a b c d):
    # pred   a a b b a a          a [2 1 0 0]   b [1 1 0 0]   c [1 0 0 0]   d [0 0 0 0]
    result = classification_metrics([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 0, 0], ["a", "b", "c", "d"])
    assert result["labels"] == ["a", "b", "c", "d"]
    assert result["confusion_matrix"] == [[2, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert result["accuracy"] == pytest.approx(3 / 6)
    assert result["per_class"] == {
        "a": prf(2 / 4, 2 / 3, 4 / 7, 3),  # F1 = 2*tp / (predicted + support) = 4/7
        "b": prf(1 / 2, 1 / 2, 1 / 2, 2),
        "c": prf(0.0, 0.0, 0.0, 1),        # never predicted: 0/0 precision counts as 0
        "d": prf(0.0, 0.0, 0.0, 0)}
    # d occurs nowhere, so it is left out of the mean (scikit-learn's default): (4/7 + 1/2 + 0) / 3
    assert result["macro_f1"] == pytest.approx(5 / 14)


def test_classification_all_correct_and_bad_input():
    result = classification_metrics([1, 0, 1], [1, 0, 1], ["neg", "pos"])
    assert (result["accuracy"], result["macro_f1"]) == (1.0, 1.0)
    with pytest.raises(ValueError, match="no references"):
        classification_metrics([], [], ["neg", "pos"])
    with pytest.raises(ValueError, match="2 references but 1 predictions"):
        classification_metrics([0, 1], [0], ["neg", "pos"])
    with pytest.raises(ValueError, match=r"prediction id 2 is not one of the 2 labels \(neg, pos\)"):
        classification_metrics([0, 1], [0, 2], ["neg", "pos"])


# --- entities -------------------------------------------------------------------------------------

def test_entities_micro_and_per_type():
    references = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "I-ORG", "O", "B-PER"]]
    predictions = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "I-ORG", "O", "O", "B-PER"]]
    # true: PER 0-2, LOC 3-4 | ORG 0-3, PER 4-5      predicted: PER 0-2, ORG 3-4 | ORG 0-2, PER 4-5
    # matched: the two PERs; the ORG 0-2 is one token short of ORG 0-3, so it does not count.
    result = entity_metrics(references, predictions)
    assert (result["precision"], result["recall"], result["f1"]) == (0.5, 0.5, 0.5)
    assert (result["true_entities"], result["predicted_entities"]) == (4, 4)
    assert result["per_type"] == {"LOC": prf(0, 0, 0, 1), "ORG": prf(0, 0, 0, 1), "PER": prf(1, 1, 1, 2)}
    assert list(result["per_type"]) == ["LOC", "ORG", "PER"]


def test_entities_read_invalid_predictions_as_conlleval_does():
    references = [["O", "B-LOC", "I-LOC", "O", "B-PER", "B-PER"]]
    predictions = [["O", "I-LOC", "I-LOC", "O", "B-PER", "I-LOC"]]
    # predicted I-LOC after O opens LOC 1-3 (a match); the last I-LOC after B-PER is its own LOC 5-6.
    # true LOC 1-3, PER 4-5, PER 5-6; predicted LOC 1-3, PER 4-5, LOC 5-6: 2 of 3 each way.
    result = entity_metrics(references, predictions)
    assert (result["precision"], result["recall"], result["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert result["per_type"] == {"LOC": prf(1 / 2, 1, 2 / 3, 1), "PER": prf(1, 1 / 2, 2 / 3, 2)}


def test_an_entity_never_spans_two_sentences():
    # The second sentence's I-PER starts an entity of its own; it does not continue the first's.
    result = entity_metrics([["B-PER", "I-PER"], ["B-PER", "O"]], [["B-PER", "I-PER"], ["I-PER", "O"]])
    assert (result["precision"], result["recall"], result["f1"]) == (1.0, 1.0, 1.0)


def test_no_predicted_entities_and_no_entities_at_all():
    result = entity_metrics([["B-PER", "O"]], [["O", "O"]])
    assert (result["precision"], result["recall"], result["f1"], result["predicted_entities"]) == (0.0, 0.0, 0.0, 0)
    assert result["per_type"] == {"PER": prf(0, 0, 0, 1)}
    result = entity_metrics([["O", "O"]], [["O", "O"]])
    assert (result["precision"], result["recall"], result["f1"], result["per_type"]) == (0.0, 0.0, 0.0, {})


def test_entity_input_errors():
    with pytest.raises(ValueError, match="sentence 1: 1 reference tags but 2 predicted tags"):
        entity_metrics([["O"], ["O"]], [["O"], ["O", "O"]])
    with pytest.raises(ValueError, match="tag 'PER' is not O, B-TYPE or I-TYPE"):
        entity_metrics([["PER"]], [["O"]])
    with pytest.raises(ValueError, match="no reference sentences"):
        entity_metrics([], [])


# --- BLEU -----------------------------------------------------------------------------------------

def test_bleu_one_sentence_worked_by_hand():
    # hyp "the cat is on the mat" (6 words), ref "there is a cat on the mat" (7 words), 13a tokens:
    #   1-grams 5/6 (the x2 clipped to 1), 2-grams 2/5 (on the, the mat), 3-grams 1/4 (on the mat),
    #   4-grams 0/3, which sacrebleu's default 'exp' smoothing makes 1/(2*3);
    #   brevity penalty exp(1 - 7/6).
    result = bleu(["the cat is on the mat"], ["there is a cat on the mat"])
    expected = math.exp(1 - 7 / 6) * (5 / 6 * 2 / 5 * 1 / 4 * 1 / 6) ** 0.25 * 100
    assert result["bleu"] == pytest.approx(expected)  # 29.06
    assert result["precisions"] == pytest.approx([500 / 6, 40, 25, 100 / 6])
    assert (result["hypothesis_length"], result["reference_length"]) == (6, 7)
    assert result["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")


def test_bleu_is_a_corpus_score_not_a_mean_of_sentences():
    # n-gram counts add up over the corpus: 1-grams (5+6)/(6+6), 2-grams (2+5)/(5+5), 3-grams (1+4)/(4+4),
    # 4-grams (0+3)/(3+3); lengths 12 against 13.
    result = bleu(["the cat is on the mat", "the cat sat on the mat"],
                  ["there is a cat on the mat", "the cat sat on the mat"])
    expected = math.exp(1 - 13 / 12) * (11 / 12 * 7 / 10 * 5 / 8 * 3 / 6) ** 0.25 * 100
    assert result["bleu"] == pytest.approx(expected)  # 61.57


def test_bleu_edge_cases():
    assert bleu(["a b c d"], ["a b c d"])["bleu"] == pytest.approx(100)
    empty_reference = bleu(["a b c"], [""])
    assert (empty_reference["bleu"], empty_reference["reference_length"]) == (0.0, 0)
    assert bleu([""], ["a b c d"])["brevity_penalty"] == 0.0
    with pytest.raises(ValueError, match="no hypotheses"):
        bleu([], [])
    with pytest.raises(ValueError, match="1 hypotheses but 2 references"):
        bleu(["a"], ["a", "b"])


# --- ROUGE ----------------------------------------------------------------------------------------

def test_rouge_worked_by_hand():
    # pred "the cat on the mat" (5 words) against ref "the cat sat on the mat" (6 words):
    #   ROUGE-1: 5 shared words, P 5/5, R 5/6, F 10/11
    #   ROUGE-2: shared bigrams "the cat", "on the", "the mat": P 3/4, R 3/5, F 2/3
    #   ROUGE-L: longest common subsequence "the cat on the mat" = 5 words, as ROUGE-1
    result = rouge(["the cat on the mat"], ["the cat sat on the mat"])
    assert result == {"rouge1": pytest.approx(10 / 11), "rouge2": pytest.approx(2 / 3),
                      "rougeL": pytest.approx(10 / 11)}


def test_rouge_is_the_mean_over_examples_and_empty_texts_score_zero():
    result = rouge(["the cat on the mat", "a b", ""], ["the cat sat on the mat", "", "a b"])
    assert result == {"rouge1": pytest.approx(10 / 11 / 3), "rouge2": pytest.approx(2 / 3 / 3),
                      "rougeL": pytest.approx(10 / 11 / 3)}


def test_rouge_stemming_and_tokenizing():
    assert rouge(["cats running"], ["cat runs"])["rouge1"] == 0.0
    assert rouge(["cats running"], ["cat runs"], use_stemmer=True)["rouge1"] == pytest.approx(1.0)
    # The default tokenizer keeps only [a-z0-9]: text in other scripts scores 0 unless tokenized otherwise.
    assert rouge(["北京 欢迎 你"], ["北京 欢迎 他"])["rouge1"] == 0.0
    assert rouge(["北京 欢迎 你"], ["北京 欢迎 他"], tokenize=str.split)["rouge1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="use_stemmer applies to rouge-score's default tokenizer only"):
        rouge(["a"], ["a"], use_stemmer=True, tokenize=str.split)
    with pytest.raises(ValueError, match="no predictions"):
        rouge([], [])
