"""The classic supervised tasks: sequence classification, token classification (NER) and seq2seq.

    from lite_sft.tasks.classification import read_classification
    from lite_sft.tasks.ner import read_ner, align_labels, entity_spans
    from lite_sft.tasks.seq2seq import read_seq2seq
    from lite_sft.tasks import metrics

Readers turn users' files into plain records and raise lite_sft.masking.DataError naming the file,
the line and the field; ner.py also moves labels between words and sub-word tokens; metrics.py
computes the figures people report for each task.
"""
