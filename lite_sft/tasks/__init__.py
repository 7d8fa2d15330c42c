"""The tasks: what differs between causal-lm, sequence classification, token classification (NER) and seq2seq.

    from lite_sft.tasks.base import get_task                 # the Task of a taskspec.TASKS row, by name
    from lite_sft.tasks.classification import read_classification
    from lite_sft.tasks.ner import read_ner, align_labels, entity_spans
    from lite_sft.tasks.seq2seq import read_seq2seq
    from lite_sft.tasks import metrics

Each task is one module exposing `TASK` (causal_lm/ is a package: its data pipeline, masking, packing, cache
and loss live with it) plus its row in lite_sft/taskspec.py. Readers turn users' files into plain records and
raise lite_sft.errors.DataError naming the file, the line and the field; split.py holds the one rule for which
records are held out for validation; ner.py also moves labels between words and sub-word tokens; metrics.py
computes the figures people report for each task.
"""
