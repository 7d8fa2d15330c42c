"""One row per task: everything outside a task's own module needs to know about it, in one place.

    spec = TASKS["seq-cls"]
    spec.auto_class           # "AutoModelForSequenceClassification": the head transformers loads
    spec.routes               # ("/v1/classify",): what `lite-sft serve` answers for it
    spec.thresholds["int8"]   # what the export gate holds its int8 graph to

The task's behaviour (reading data, collating, loss, metrics) lives in its module under lite_sft/tasks/, named
by `module`; lite_sft.tasks.get_task imports it. Adding a task is that module and one row here: training,
export, serving, bench and the CLI read every choice, table and word from this file. This module is core: it
imports nothing of lite-sft's but the error tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# What the gate holds each candidate to, by the precision it was made in (parity.compare reads them). A causal
# LM's, and seq2seq's: its logits span a vocabulary too.
GENERATION_THRESHOLDS = {
    "float32": {"min_agreement": 1.0, "max_abs_rel": 1e-3},
    "float16": {"min_agreement": 0.95, "mean_abs_rel": 1e-3},
    "bfloat16": {"min_agreement": 0.90, "mean_abs_rel": 5e-3},
    "int8": {"min_agreement": 0.85, "mean_abs_rel": 2e-2},
    "int4": {"min_agreement": 0.70, "mean_abs_rel": 5e-2},
}
# A classifier's few logits are all large ones, so its mean |dlogit| relative to the largest is close to a
# max, where an LM's is the mean over a whole vocabulary of mostly small logits: a trained all-MiniLM-L6-v2
# on SST-2 keeps every label in int8 with a relative mean of 2.5e-2, over causal-lm's 2e-2. Classifiers are
# held to more agreement (their labels are what a user reads) and a looser logit bound, with the measured
# margins in the README. fp32 and the 16-bit merges keep causal-lm's thresholds.
CLASSIFIER_THRESHOLDS = {**GENERATION_THRESHOLDS, "int8": {"min_agreement": 0.90, "mean_abs_rel": 5e-2},
                         "int4": {"min_agreement": 0.85, "mean_abs_rel": 1e-1}}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    """The name `--task` and config.yaml's task.name take."""
    module: str
    """The module under lite_sft/tasks/ whose `TASK` implements lite_sft.tasks.base.Task for it."""
    auto_class: str
    """The transformers Auto class that loads the base with this task's head."""
    peft_task_type: str
    """peft's TaskType name, which adapter_config.json records as `task_type`."""
    hf_task: str
    """The task in Hugging Face's exporter vocabulary: parity.json's `optimum_task`."""
    words: str
    """What a model of this task is, in a sentence: "a sequence classifier"."""
    routes: tuple[str, ...]
    """The HTTP routes `lite-sft serve` answers for it."""
    generates: bool
    """It writes tokens (a KV cache, stop ids, sampling) rather than scoring its input once."""
    thresholds: dict = field(default_factory=lambda: GENERATION_THRESHOLDS)
    """The export gate's thresholds by precision."""
    gate_examples: int = 0
    """Held-out examples the export gate compares on by default (causal-lm's prompts are its own setting)."""
    agreement: str = "greedy tokens"
    """What the gate's agreement figure counts."""
    hf_aliases: tuple[str, ...] = ()
    """Other names older exports' parity.json may give the task."""
    onnx_dtypes: tuple[str, ...] = ("fp32",)
    """The ONNX precisions `lite-sft export --dtype` writes for it (the others shrink with --quantize instead)."""
    gate_on: str = "examples"
    """What the export gate runs through each model: "prompts", held-out prompts it continues greedily
    (export/parity.py), or "examples", the task's own held-out rows (export/parity_tasks.py)."""
    encoder_decoder: bool = False
    """It reads the prompt with an encoder and writes with a decoder that starts from tokens of its own: no chat
    template, and its caches are not joined (serving batches it statically)."""
    per_token: bool = False
    """A classifier whose logits are a row per token (an IOB2 tag each, read into entities), not one per input."""

    @property
    def endpoints(self) -> str:
        """The routes as an error message names them: "POST /v1/classify"."""
        return "POST " + " and ".join(self.routes)


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("causal-lm", "causal_lm", "AutoModelForCausalLM", "CAUSAL_LM", "text-generation-with-past",
             "a causal language model", ("/v1/completions", "/v1/chat/completions"), generates=True,
             hf_aliases=("text-generation",), onnx_dtypes=("fp32", "fp16"), gate_on="prompts"),
    TaskSpec("seq-cls", "classification", "AutoModelForSequenceClassification", "SEQ_CLS", "text-classification",
             "a sequence classifier", ("/v1/classify",), generates=False, thresholds=CLASSIFIER_THRESHOLDS,
             gate_examples=32, agreement="labels of the examples"),
    TaskSpec("token-cls", "token_cls", "AutoModelForTokenClassification", "TOKEN_CLS", "token-classification",
             "a token classifier (NER)", ("/v1/ner",), generates=False, thresholds=CLASSIFIER_THRESHOLDS,
             gate_examples=32, agreement="labels of every token", per_token=True),
    TaskSpec("seq2seq", "seq2seq", "AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM", "text2text-generation-with-past",
             "an encoder-decoder (seq2seq) model", ("/v1/completions",), generates=True, gate_examples=8,
             agreement="greedy next tokens, teacher-forced", hf_aliases=("text2text-generation",),
             encoder_decoder=True),
)}
TASK_NAMES = tuple(TASKS)


def task_named(name: str | None) -> TaskSpec | None:
    """The row for a name lite-sft or Hugging Face's exporter vocabulary gives a task (None if neither)."""
    for spec in TASKS.values():
        if name in (spec.name, spec.hf_task, *spec.hf_aliases):
            return spec
    return None


def task_of_peft_type(task_type: str | None) -> TaskSpec:
    """The row for adapter_config.json's `task_type` (an adapter without one is a causal LM's)."""
    return next((spec for spec in TASKS.values() if spec.peft_task_type == task_type), TASKS["causal-lm"])


def serving(route: str) -> tuple[str, ...]:
    """The tasks whose models answer `route`."""
    return tuple(spec.name for spec in TASKS.values() if route in spec.routes)


ROUTES = tuple(dict.fromkeys(route for spec in TASKS.values() for route in spec.routes))
