"""The runs of a multi-adapter export, read and checked against each other before anything is built.

    runs = read_runs([Path("runs/sentiment"), Path("runs/support")], ["support=helpdesk"], opts)
    runs[1].name, runs[1].scale, runs[1].sites      # "helpdesk", alpha / r, {site: {"A", "B"}} (adapters.peft_sites)

The runs are all causal-lm (one decoder graph, export/lora_graph.py) or all classifiers, seq-cls and token-cls
mixed (one trunk graph and a head per run, export/multi_encoder.py). Runs share one base graph only when everything
the graph bakes in is the same for all of them, so each of these is refused up front, in one line naming the runs
and what differs: a causal-lm run beside a classifier, a seq2seq run, an encoder-decoder base; another base (the
sha256 digest of the resolved base folder's config and weight files: a copy of one base is that base); another
quantisation (a 4-bit run's adapter learned the dequantised NF4 weights, an 8-bit run's the dequantised int8
ones, a 16/32-bit run's the checkpoint's own); another tokenizer (vocabulary, added tokens, chat template); DoRA
(its magnitude vector rescales the whole projection, not a low-rank delta); LoRA on anything but the decoder
layers' projections (embed_tokens, lm_head, a task head) or modules saved whole (modules_to_save); an architecture
the model builder does not take (the LoRA branches go beside the builder's projections, export/lora_graph.py).
A classifier's head is its own (each run has its head graph), so there its task head saved whole and LoRA outside
the trunk (DistilBERT's pre_classifier) are taken; anything else trained inside the trunk but LoRA is not.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from lite_sft.adapters import peft_sites, peft_trunk_sites, site_targets
from lite_sft.artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODEL_CONFIG, TRAINABLE_FILE
from lite_sft.tasks.base import get_task
from lite_sft.taskspec import TASKS

from . import ExportError
from .exporters import builder
from .merge import base_path, read_run

# A name /v1/models lists and a request's `model` carries in a URL path (DELETE /v1/adapters/{name}).
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RESERVED = ("base",)  # /v1/models lists the base under this name
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass
class Run:
    run_dir: Path
    name: str
    cfg: object
    base: str
    """The resolved base folder."""
    rank: int = 0
    alpha: float = 0.0
    scale: float = 0.0
    rslora: bool = False
    digest: str = ""
    """sha256 of the base folder's config and weight files (base_digest)."""
    sites: dict = field(default_factory=dict)
    """{site: {"A": (in, r), "B": (r, out) scaled}}, from the run's adapter_model.safetensors."""
    prefix: str = ""
    """A classifier's trunk: its task class's base_model_prefix (bert, roberta, ...); "" for causal-lm."""

    @property
    def task(self) -> str:
        return self.cfg.task.name

    @property
    def classifier(self) -> bool:
        return self.task != "causal-lm"

    @property
    def targets(self) -> list[str]:
        """The modules it trains: a decoder's projection names (q_proj), a trunk's module paths without the layer
        (attention.self.query, pooler.dense)."""
        return site_targets(self.sites)


def read_runs(run_dirs: list[Path], names: list[str], dtype: str) -> list[Run]:
    """Every run, named and checked against the others (module docstring); the first problem is one ExportError."""
    run_dirs = [Path(r) for r in run_dirs]
    resolved = [r.resolve() for r in run_dirs]
    if len(set(resolved)) != len(resolved):
        twice = next(str(r) for r, p in zip(run_dirs, resolved) if resolved.count(p) > 1)
        raise ExportError(f"{twice} is given twice: name each run once")
    runs = [Run(r, r.name, read_run(r), "") for r in run_dirs]
    _name(runs, names)
    _check_tasks(runs)
    for run in runs:
        _check_run(run)
    first = runs[0]
    for run in runs[1:]:
        if run.cfg.model.quant != first.cfg.model.quant:
            raise ExportError(_quant_mix(first, run))
    digests: dict[str, str] = {}  # each base folder hashed once
    for run in runs:
        run.base = _local_folder(base_path(run.cfg, run.run_dir), run)
        if run.base not in digests:
            digests[run.base] = base_digest(run.base)
        run.digest = digests[run.base]
    for run in runs[1:]:
        if run.digest != first.digest:
            raise ExportError(f"{first.run_dir} and {run.run_dir} were tuned on different bases ({first.base}, "
                              f"{first.digest[:19]}... and {run.base}, {run.digest[:19]}...: the config or weight "
                              "files differ): export together only runs of one base")
    if first.classifier:
        _check_encoder(runs, dtype)
    else:
        _check_builder(first, dtype)
    _check_tokenizers(runs)
    for run in runs:
        _read_adapter(run)
    return runs


def base_digest(folder: str) -> str:
    """sha256 over the base folder's config.json and weight files (names and bytes, in name order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(folder).iterdir()
                   if p.is_file() and (p.name == MODEL_CONFIG or p.name.endswith(WEIGHT_SUFFIXES)))
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _local_folder(path: str, run: Run) -> str:
    """The base as a local folder: a hub id is looked up in the Hugging Face cache (the run downloaded it there)."""
    if not Path(path).is_dir():
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(path, local_files_only=True)
        except Exception as err:  # noqa: BLE001  (huggingface_hub raises several types for a missing snapshot)
            raise ExportError(f"the base of {run.run_dir} ({path}) is not in the local Hugging Face cache, so its "
                              "weights cannot be compared with the other runs' base: download it first") from err
    return str(Path(path).resolve())


def _name(runs: list[Run], names: list[str]) -> None:
    by_path = {run.run_dir.resolve(): run for run in runs}
    for given in names:
        run_text, sep, name = given.rpartition("=")
        if not sep or not run_text or not name:
            raise ExportError(f"--name {given!r}: write RUN=NAME, RUN one of the run directories given")
        run = by_path.get(Path(run_text).resolve()) or next((r for r in runs if r.run_dir.name == run_text), None)
        if run is None:
            raise ExportError(f"--name {given}: {run_text} is not one of the runs given "
                              f"({', '.join(str(r.run_dir) for r in runs)})")
        run.name = name
    for run in runs:
        if not NAME.match(run.name) or run.name in RESERVED:
            why = (f"'{run.name}' is the base's name" if run.name in RESERVED else
                   "a name is letters, digits, '.', '_' or '-', at most 64, starting with a letter or digit")
            raise ExportError(f"the adapter name {run.name!r} of {run.run_dir} cannot be served ({why}): "
                              f"rename it with --name {run.run_dir}=NAME")
    seen: dict[str, Run] = {}
    for run in runs:
        if run.name in seen:
            raise ExportError(f"{seen[run.name].run_dir} and {run.run_dir} are both named {run.name!r}: rename one "
                              f"with --name {run.run_dir}=NAME")
        seen[run.name] = run


def _check_tasks(runs: list[Run]) -> None:
    """All causal-lm, or all classifiers (seq-cls and token-cls may mix: the trunk is shared, the heads are not)."""
    for run in runs:
        if TASKS[run.task].encoder_decoder:
            raise ExportError(f"{run.run_dir} is a {run.task} run: an encoder-decoder's adapters are not exported "
                              f"onto one shared graph (causal-lm runs and classifiers are); export it alone with "
                              f"`lite-sft export {run.run_dir} --out OUT`")
    decoder = next((run for run in runs if not run.classifier), None)
    classifier = next((run for run in runs if run.classifier), None)
    if decoder is not None and classifier is not None:
        raise ExportError(f"{decoder.run_dir} is a causal-lm run and {classifier.run_dir} a {classifier.task} run: "
                          "one export shares a decoder among causal-lm runs or an encoder among classifiers, not "
                          "both; export them separately")


def _check_run(run: Run) -> None:
    cfg, where = run.cfg, run.run_dir
    if cfg.lora.use_dora:
        raise ExportError(f"{where} is a DoRA run: its magnitude vector rescales the whole projection, which a LoRA "
                          f"branch beside the base cannot add; export it alone (merged) with `lite-sft export {where} "
                          "--out OUT`")
    adapter = json.loads((where / ADAPTER_CONFIG).read_text())
    # A classifier's head goes into its own head graph; anything else saved whole would be inside the shared base.
    heads = get_task(cfg.task.name).head_names if run.classifier else ()
    whole = [name for name in adapter.get("modules_to_save") or [] if name not in heads]
    if whole or (where / TRAINABLE_FILE).is_file():
        saved = ", ".join(whole) or TRAINABLE_FILE
        raise ExportError(f"{where} trains whole modules ({saved}), which the shared base graph cannot swap per "
                          f"request; export it alone with `lite-sft export {where} --out OUT`")
    if adapter.get("rank_pattern") or adapter.get("alpha_pattern"):
        raise ExportError(f"{where}: its adapter has per-module ranks or alphas (rank_pattern / alpha_pattern), "
                          "which a multi-adapter export does not take; export it alone")
    run.rank, run.alpha = int(adapter["r"]), float(adapter["lora_alpha"])
    run.rslora = bool(adapter.get("use_rslora"))
    run.scale = run.alpha / (math.sqrt(run.rank) if run.rslora else run.rank)


def _quant_mix(first: Run, run: Run) -> str:
    what = {"4bit": "the dequantised NF4 weights", "8bit": "the dequantised int8 weights",
            "none": "the checkpoint's own weights"}
    return (f"{first.run_dir} ({first.cfg.model.quant}) and {run.run_dir} ({run.cfg.model.quant}) cannot share one "
            f"base graph: the first adapter was trained against {what[first.cfg.model.quant]}, the second against "
            f"{what[run.cfg.model.quant]}; export them separately (`lite-sft export {first.run_dir} --out OUT_A` and "
            f"`lite-sft export {run.run_dir} --out OUT_B`), or together only runs of one quantisation")


def _check_builder(run: Run, dtype: str) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(run.base, trust_remote_code=run.cfg.model.trust_remote_code)
    why = builder.refuses(config, dtype)
    if why is not None:
        raise ExportError(f"the base of {run.run_dir} ({run.cfg.model.name_or_path}) cannot be exported with "
                          f"adapters: the LoRA branches go into onnxruntime-genai's model builder graph, and {why}; "
                          "export each run alone (merged) instead")


def _check_encoder(runs: list[Run], dtype: str) -> None:
    """The classifiers' base: not an encoder-decoder, fp32, and each task class's trunk (base_model_prefix), read
    from transformers' Auto class mapping for the config, so no weights are loaded to learn it."""
    import transformers
    from transformers import AutoConfig

    first = runs[0]
    config = AutoConfig.from_pretrained(first.base, trust_remote_code=first.cfg.model.trust_remote_code)
    if getattr(config, "is_encoder_decoder", False):
        raise ExportError(f"the base of {first.run_dir} ({first.cfg.model.name_or_path}) is an encoder-decoder "
                          f"({config.model_type}): its classifiers run a decoder too, so they share no single trunk; "
                          "export each run alone")
    if dtype != "fp32":
        raise ExportError(f"--dtype {dtype}: classifiers export in fp32 (shrink them with --quantize int8 or int4)")
    for run in runs:
        auto = getattr(transformers, TASKS[run.task].auto_class)
        try:
            run.prefix = auto._model_mapping[type(config)].base_model_prefix
        except (KeyError, AttributeError):
            raise ExportError(f"{run.run_dir}: transformers has no {TASKS[run.task].auto_class} class for "
                              f"{config.model_type} whose trunk the runs could share; export it alone") from None
        if not run.prefix:
            raise ExportError(f"{run.run_dir}: the {config.model_type} {run.task} model names no trunk "
                              "(base_model_prefix); export it alone")


def _check_tokenizers(runs: list[Run]) -> None:
    from transformers import AutoTokenizer

    def facts(run: Run) -> dict:
        tok = AutoTokenizer.from_pretrained(run.run_dir)
        return {"vocabulary": tok.get_vocab(),
                "added tokens": {i: str(t) for i, t in tok.added_tokens_decoder.items()},
                "chat template": tok.chat_template}

    first = facts(runs[0])
    for run in runs[1:]:
        other = facts(run)
        for what in first:
            if first[what] != other[what]:
                detail = ""
                if what != "chat template":
                    only = sorted(set(map(str, other[what].items())) ^ set(map(str, first[what].items())))
                    detail = f" ({len(first[what])} and {len(other[what])} entries; e.g. {only[0]})"
                raise ExportError(f"{runs[0].run_dir} and {run.run_dir} have different tokenizers: the {what} "
                                  f"differs{detail}; one server tokenizes for every adapter, so export them "
                                  "separately")


def _read_adapter(run: Run) -> None:
    from safetensors.torch import load_file

    path = run.run_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        raise ExportError(f"{run.run_dir} holds no {ADAPTER_WEIGHTS} (an older peft's .bin): tune it again or export "
                          "it alone")
    if run.classifier:
        _read_classifier_adapter(run, load_file(path))
    else:
        try:
            run.sites = peft_sites(load_file(path), run.scale)
        except ValueError as err:
            raise ExportError(f"{run.run_dir} trains LoRA outside the decoder layers' projections ({err}); a "
                              "multi-adapter export serves those only: export it alone") from err
    if not run.sites:
        raise ExportError(f"{run.run_dir}: its {ADAPTER_WEIGHTS} holds no LoRA matrix")


def _read_classifier_adapter(run: Run, state: dict) -> None:
    """The LoRA matrices inside the trunk are the run's sites; its head (saved whole, or LoRA outside the trunk)
    is merged into its head graph; anything else inside the trunk (new token rows) the shared trunk cannot hold."""
    try:
        run.sites, outside = peft_trunk_sites(state, run.scale, run.prefix)
    except ValueError as err:
        raise ExportError(f"{run.run_dir}: {err}; tune it again or export it alone") from err
    trunk = re.compile(rf"^(?:base_model\.model\.)?{re.escape(run.prefix)}\.")
    inside = [key for key in outside if trunk.match(key)]
    if inside:
        raise ExportError(f"{run.run_dir} trains {inside[0]} inside the shared trunk ({run.prefix}) other than as "
                          "LoRA matrices, which the trunk graph cannot swap per request: export it alone")
