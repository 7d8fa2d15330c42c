"""NER: IOB2 checks, CoNLL/JSONL reading, and labels moved between words and sub-words on real tokenizers.

The WordPiece tokenizer is BERT's design on a hand-written vocabulary, so every split is visible here:

    0 [PAD]  1 [UNK]  2 [CLS]  3 [SEP]  4 peter  5 black  6 ##burn  7 ##s  8 visited  9 new  10 york  11 .

The byte-level BPE is trained on three phrases; "Blackburn" (never seen whole) splits into ĠBl ack burn.
Tag ids throughout are build_tag_map's: 0 O, 1 B-LOC, 2 I-LOC, 3 B-PER, 4 I-PER.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lite_sft.errors import DataError
from lite_sft.tasks.base import IGNORE_INDEX
from lite_sft.tasks.iob import entities, iob1_to_iob2, iob2_error
from lite_sft.tasks.labels import LabelMap
from lite_sft.tasks.ner import (TaggedSentence, align_labels, build_tag_map, encode_tags, entity_spans, read_ner,
                                split_words, word_predictions)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
X = IGNORE_INDEX
TAGS = LabelMap(("O", "B-LOC", "I-LOC", "B-PER", "I-PER"))
WORDS = ["Peter", "Blackburn", "visited", "New", "York"]
WORD_TAGS = ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]
WORD_IDS = [3, 4, 0, 1, 2]


@pytest.fixture(scope="module")
def wordpiece() -> PreTrainedTokenizerFast:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "peter", "black", "##burn", "##s", "visited", "new", "york", "."]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")


@pytest.fixture(scope="module")
def byte_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Peter visited New York", "Black Jack", "sunburn and windburn"] * 5, trainer)
    # add_prefix_space=True, as RoBERTa needs for pre-split words: without it the wrapper turns the
    # pre-tokenizer's option off and every word is encoded as if it began the text.
    return PreTrainedTokenizerFast(tokenizer_object=tok, add_prefix_space=True, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- IOB2 -----------------------------------------------------------------------------------------

def test_iob2_error_finds_the_first_bad_tag():
    assert iob2_error(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC"]) is None
    assert iob2_error(["O", "I-PER"])[0] == 1
    assert "follows 'B-PER'" in iob2_error(["B-PER", "I-LOC"])[1]
    assert iob2_error(["O", "PER"]) == (1, "tag 'PER' is not O, B-TYPE or I-TYPE")
    assert "IOBES/BILOU tags are not supported" in iob2_error(["S-PER"])[1]


def test_iob1_to_iob2_marks_every_entity_start_with_b():
    iob1 = ["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG", "I-ORG"]
    assert iob1_to_iob2(iob1) == ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG", "I-ORG"]


@pytest.mark.parametrize("tags, expected", [
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),   # the last runs to the end
    (["B-PER", "B-PER", "I-PER"], [("PER", 0, 1), ("PER", 1, 3)]),       # B- splits two of one type
    (["O", "I-LOC", "I-LOC"], [("LOC", 1, 3)]),                          # conlleval: I- after O starts one
    (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 1), ("LOC", 1, 3)]),       # and so does a change of type
    (["O", "O"], []),
])
def test_entities_follow_conlleval(tags, expected):
    assert entities(tags) == expected


# --- reading --------------------------------------------------------------------------------------

def test_conll_sentences_docstart_and_the_last_column(tmp_path):
    path = write(tmp_path / "d.conll", "-DOCSTART- -X- O O\n\nPeter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n\n\n"
                                       "BRUSSELS NNP B-NP B-LOC\n-DOCSTART- -X- O O\nYork NNP B-NP B-LOC")
    sentences = read_ner(path)
    assert [(s.where, s.tokens, s.tags) for s in sentences] == [
        (f"{path} line 3", ["Peter", "Blackburn"], ["B-PER", "I-PER"]),
        (f"{path} line 7", ["BRUSSELS"], ["B-LOC"]),
        (f"{path} line 9", ["York"], ["B-LOC"])]


def test_a_tag_column_that_is_not_the_last(tmp_path):
    path = write(tmp_path / "d.txt", "EU B-ORG 0\nrejects O 0\n")
    with pytest.raises(DataError, match=r"d\.txt line 1: tag '0' is not O, B-TYPE or I-TYPE; tag_column=-1 reads "
                                        r"'0' of 'EU B-ORG 0', but column 1 holds 'B-ORG': set --tag-column 1 \(task\.tag_column=1\)"):
        read_ner(path)
    assert read_ner(path, tag_column=1)[0].tags == ["B-ORG", "O"]


def test_an_i_tag_without_its_b_is_an_error_naming_the_line(tmp_path):
    path = write(tmp_path / "d.txt", "The O\nEU I-ORG\n\nPeter I-PER\nBlackburn I-PER\n")
    with pytest.raises(DataError, match=r"d\.txt line 2 \('EU'\): tag 'I-ORG' follows 'O', but in IOB2 every entity "
                                        r"starts with B- \(B-ORG here\); .* scheme='iob1'"):
        read_ner(path)
    assert [s.tags for s in read_ner(path, scheme="iob1")] == [["O", "B-ORG"], ["B-PER", "I-PER"]]


@pytest.mark.parametrize("content, message", [
    ("Peter\n", r"line 1: one field 'Peter', but a CoNLL line is `token ... tag`"),
    ("Peter B-PER\nvisited O\nBrussels B-LOC extra\n",
     r"line 3: tag 'extra' is not O.*column 1 holds 'B-LOC': set --tag-column 1 \(task.tag_column=1\)"),
    ("Peter B-PER\nvisited\tO\nX S-LOC\n", r"line 3: tag 'S-LOC' .*IOBES/BILOU tags are not supported"),
    ("\n\n-DOCSTART- O\n", "no sentences"),
])
def test_conll_errors(tmp_path, content, message):
    with pytest.raises(DataError, match=message):
        read_ner(write(tmp_path / "d.txt", content))


def test_jsonl_with_named_keys_and_tag_ids(tmp_path):
    lines = [{"words": ["Peter", "Blackburn"], "ner": [1, 2]}, {"words": ["Brussels"], "ner": [3]}]
    path = write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    sentences = read_ner(path, tokens_key="words", tags_key="ner", tag_names=["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
    assert [(s.where, s.tokens, s.tags) for s in sentences] == [
        (f"{path} line 1", ["Peter", "Blackburn"], ["B-PER", "I-PER"]), (f"{path} line 2", ["Brussels"], ["B-LOC"])]
    with pytest.raises(DataError, match=r"line 1: ner\[0\] is the id 1; pass tag_names"):
        read_ner(path, tokens_key="words", tags_key="ner")


@pytest.mark.parametrize("record, message", [
    ({"tokens": ["a", "b"], "tags": ["O"]}, r"line 1: 2 tokens but 1 tags; give exactly one tag per token"),
    ({"tokens": [], "tags": []}, r"line 1: field 'tokens' must be a non-empty list"),
    ({"tokens": "a b", "tags": ["O", "O"]}, r"line 1: field 'tokens' must be a non-empty list"),
    ({"tokens": ["a", ""], "tags": ["O", "O"]}, r"line 1: tokens\[1\] must be a non-empty string"),
    ({"tokens": ["a", "b"], "tags": ["O", "I-PER"]}, r"line 1 token 1 \('b'\): tag 'I-PER' follows 'O'"),
    ({"words": ["a"], "tags": ["O"]}, r"line 1: no field 'tokens'; the line has words, tags; set --tokens-key"),
])
def test_jsonl_errors(tmp_path, record, message):
    with pytest.raises(DataError, match=message):
        read_ner(write(tmp_path / "d.jsonl", json.dumps(record) + "\n"))


def test_tag_map_puts_o_first_and_completes_b_and_i(tmp_path):
    sentences = [TaggedSentence("t line 1", ["Peter", "Paris"], ["B-PER", "B-LOC"]),
                 TaggedSentence("t line 4", ["Peter", "Pan"], ["B-PER", "I-PER"])]
    assert build_tag_map(sentences, "t") == TAGS  # I-LOC is in, though only B-LOC was seen
    with pytest.raises(DataError, match="t: every tag is O"):
        build_tag_map([TaggedSentence("t line 1", ["a"], ["O"])], "t")


def test_an_unknown_tag_in_evaluation_data_names_its_line(tmp_path):
    dev = read_ner(write(tmp_path / "dev.txt", "Peter B-PER\nat O\nWimbledon B-EVENT\n"))
    assert encode_tags(TaggedSentence("x", ["Peter"], ["B-PER"]), TAGS) == [3]
    with pytest.raises(DataError, match=r"dev\.txt line 3 \('Wimbledon'\): unknown label 'B-EVENT' .* \(O, B-LOC, "):
        encode_tags(dev[0], TAGS)


@pytest.mark.skipif(not (SHARED_DATA / "conll2003").is_dir(),
                    reason="the shared CoNLL-2003 files are not beside the project")
def test_conll2003_reads_with_its_tag_column():
    sentences = read_ner(SHARED_DATA / "conll2003" / "valid.txt", tag_column=1)
    assert len(sentences) == 3250 and sum(len(s.tokens) for s in sentences) == 51362
    assert build_tag_map(sentences, "valid").names == ("O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG",
                                                       "B-PER", "I-PER")


# --- words <-> sub-words --------------------------------------------------------------------------

def test_wordpiece_labels_only_the_first_piece_of_each_word(wordpiece):
    words = ["Peter", "Blackburns", "visited", "New", "York"]
    enc = wordpiece(words, is_split_into_words=True)
    assert enc.tokens() == ["[CLS]", "peter", "black", "##burn", "##s", "visited", "new", "york", "[SEP]"]
    assert align_labels(enc.word_ids(), WORD_IDS) == [X, 3, 4, X, X, 0, 1, 2, X]


def test_truncation_keeps_the_first_piece_of_a_cut_word(wordpiece):
    enc = wordpiece(["Peter", "Blackburns", "visited"], is_split_into_words=True, truncation=True, max_length=4)
    assert enc.tokens() == ["[CLS]", "peter", "black", "[SEP]"]
    assert align_labels(enc.word_ids(), [3, 4, 0]) == [X, 3, 4, X]
    assert word_predictions(enc.word_ids(), ["-", "B-PER", "I-PER", "-"], 3, fill="O") == ["B-PER", "I-PER", "O"]


def test_byte_level_bpe_labels_only_the_first_piece_of_each_word(byte_bpe):
    enc = byte_bpe(WORDS, is_split_into_words=True)
    assert enc.tokens() == ["<s>", "ĠPe", "ter", "ĠBl", "ack", "burn", "Ġvis", "ite", "d", "ĠNe", "w", "ĠYo", "rk",
                            "</s>"]
    assert align_labels(enc.word_ids(), WORD_IDS) == [X, 3, X, 4, X, X, 0, X, X, 1, X, 2, X, X]


def test_word_ids_beyond_the_labels_are_an_error():
    with pytest.raises(ValueError, match="word id 2 but only 2 word labels"):
        align_labels([None, 0, 1, 2, None], [0, 0])


def test_predictions_come_back_from_the_first_piece(wordpiece):
    # A word the normaliser deletes (a zero-width space) gets no token, hence the fill.
    words = ["Peter", "\u200b", "Blackburns"]
    enc = wordpiece(words, is_split_into_words=True)
    assert enc.word_ids() == [None, 0, 2, 2, 2, None]
    per_token = ["junk", "B-PER", "I-PER", "B-LOC", "B-LOC", "junk"]  # later pieces must be ignored
    assert word_predictions(enc.word_ids(), per_token, len(words), fill="O") == ["B-PER", "O", "I-PER"]
    with pytest.raises(ValueError, match="6 word ids but 2 token predictions"):
        word_predictions(enc.word_ids(), ["O", "O"], 3, fill="O")


def test_labels_survive_the_round_trip(byte_bpe):
    enc = byte_bpe(WORDS, is_split_into_words=True)
    assert word_predictions(enc.word_ids(), align_labels(enc.word_ids(), WORD_IDS), len(WORDS), fill=0) == WORD_IDS


def test_entity_spans_point_into_the_original_text(wordpiece):
    text = "Peter  Blackburns visited New York ."
    words, offsets = split_words(text)
    assert offsets == [(0, 5), (7, 17), (18, 25), (26, 29), (30, 34), (35, 36)]
    enc = wordpiece(words, is_split_into_words=True)
    per_token = ["-", "B-PER", "I-PER", "-", "-", "O", "B-LOC", "I-LOC", "O", "-"]
    tags = word_predictions(enc.word_ids(), per_token, len(words), fill="O")
    spans = entity_spans(text, offsets, tags, scores=[0.9, 0.7, 0.99, 0.8, 0.6, 0.95])
    assert spans == [{"entity": "PER", "start": 0, "end": 17, "text": "Peter  Blackburns", "score": pytest.approx(0.8)},
                     {"entity": "LOC", "start": 26, "end": 34, "text": "New York", "score": pytest.approx(0.7)}]
    assert entity_spans(text, offsets, ["O", "I-PER", "O", "O", "O", "B-LOC"]) == [
        {"entity": "PER", "start": 7, "end": 17, "text": "Blackburns"},
        {"entity": "LOC", "start": 35, "end": 36, "text": "."}]
    with pytest.raises(ValueError, match="5 tags, 6 word offsets"):
        entity_spans(text, offsets, tags[:5])
