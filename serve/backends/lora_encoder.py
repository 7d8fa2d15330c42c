"""Classifiers (seq-cls, token-cls) tuned on one base, served together: one trunk run for every row of a batch,
then each row's own head.

    backend = LoraEncoderBackend("exports/team/onnx", "auto", manifest_dir="exports/team")   # factory.load_backend
    backend.logits(rows, ["sentiment", "ner"])   # row 0 by sentiment's head (labels,), row 1 by ner's (tokens, labels)
    backend.load_adapter("topic", "exports/topic/adapters/topic.onnx_adapter")   # its head: exports/topic/heads/

The export (lite_sft/adapters.py, export/encoder_lora.py) holds the trunk graph with LoRA branches (OUT/onnx, or
its int8 variant), and per adapter its LoRA file and its head graph (OUT/heads/NAME.onnx, the run's own classifier
with the trunk cut off), its task and labels in adapters.json. A call pads the rows on the right (encoder.py's
pad_right), runs the trunk once with each row's mask on its adapter's columns of the banks (lora.py's Bank: every
adapter's columns side by side, zeros where one trains no site), then each adapter's head on its rows.

The banks are device tensors bound to one IO binding, again only when a load or unload made a new Bank; a call
binds only the tokens and the mask. Every row names its adapter: the trunk has no head of its own, so there is no
bare base to score with. An adapter loaded while serving comes from another classifier export of the same base:
its head and its task and labels are read from the export it sits in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lite_sft.adapters import HEADS_DIR, MANIFEST_FILE, MASK_INPUT, AdapterEntry, read_manifest
from lite_sft.artifacts import MODEL_CONFIG, ONNX_FILE
from lite_sft.errors import ServeError, UnknownAdapter
from lite_sft.taskspec import TASKS

from .devices import NP_TYPES, onnx_precision, open_session
from .encoder import PASS_TOKENS, check_labels, config_pad_id, length_groups, pad_right
from .folder import max_context
from .lora import Adapter, BankedAdapters

CLASSIFIERS = tuple(name for name, spec in TASKS.items() if not spec.generates)  # seq-cls, token-cls
HEAD_TOKENS = ("input_ids", "attention_mask")  # what a head graph may read besides the trunk's outputs


def serves_classifiers(manifest) -> bool:
    """An adapters.json of classifier adapters (export/encoder_lora.py's layout) rather than a decoder's."""
    return manifest.base.get("kind") == "encoder" or any(entry.task in CLASSIFIERS for entry in manifest.adapters)


@dataclass
class Classifier(Adapter):
    """A loaded classifier adapter: its LoRA (Adapter) and its head, task and labels."""

    task: str = "seq-cls"
    labels: list[str] = field(default_factory=list)
    head: Any = field(default=None, repr=False)
    """The head graph's onnxruntime session."""
    reads: list[str] = field(default_factory=list)
    """The head graph's inputs: trunk outputs, and input_ids / attention_mask where it reads them."""
    head_file: str = ""

    def describe(self) -> dict:
        return {**super().describe(), "task": self.task, "num_labels": len(self.labels)}


class LoraEncoderBackend(BankedAdapters):
    """Classifier adapters over one trunk graph with LoRA branches (protocol.ScoringAdapters)."""

    def __init__(self, folder: str | Path, device: str = "auto", threads: int | None = None, *,
                 manifest_dir: str | Path):
        self.folder, self.manifest_dir = Path(folder), Path(manifest_dir)
        self.device_name, self.threads = device, threads  # every head's session opens as the trunk's did
        self.session = open_session(self.folder / ONNX_FILE, device, threads)
        self.provider = self.session.get_providers()[0]
        self.device = torch.device("cuda" if self.provider == "CUDAExecutionProvider" else "cpu")
        inputs = self._open_banks(self.session, self.manifest_dir)
        self.token_inputs = [name for name in inputs if name != MASK_INPUT and not name.startswith("lora.")]
        self.outputs = [o.name for o in self.session.get_outputs()]
        config = json.loads((self.folder / MODEL_CONFIG).read_text())
        self.vocab_size, self.pad_id = config.get("vocab_size"), config_pad_id(self.folder)
        self.max_context = max_context(self.folder)
        self.name, self.precision = f"onnx-{self.folder.name}", onnx_precision(self.folder, False)
        # The first adapter's task, as parity.json's `task` is the first run's: what /health calls the server.
        self.task = next((entry.task for entry in self.manifest.adapters), CLASSIFIERS[0])
        self.pass_tokens = PASS_TOKENS  # length_groups' price of a pass (encoder.py)
        self.fast = True  # the tokenizer's, once check_tokenizer has seen it: /v1/ner needs a fast one
        self._binding, self._bound = self.session.io_binding(), -1  # the bank version bound to _binding
        self._add([self._classifier(adapter, self.manifest_dir, entry)
                   for entry, adapter in self._manifest_files(self.manifest_dir)])

    # -- what it serves -----------------------------------------------------------------------------------------

    def describe(self) -> str:
        served = ", ".join(f"{name}: {a.task}" for name, a in self.adapters.items())
        return (f"{self.folder} on onnxruntime {self.provider} ({self.precision}), {len(self.adapters)} classifier "
                f"adapter{'s' if len(self.adapters) != 1 else ''}" + (f" ({served})" if served else ""))

    def weight_bytes(self) -> int:
        """The trunk graph and the heads on disk."""
        heads = [Path(adapter.head_file) for adapter in self.adapters.values()]
        return (sum(p.stat().st_size for p in self.folder.iterdir() if ".onnx" in p.name)
                + sum(p.stat().st_size for p in heads if p.is_file()))

    def check_tokenizer(self, tokenizer) -> None:
        """As encoder.py's: /v1/ner needs a fast tokenizer (any token-cls adapter, now or loaded later); also caps
        the context at the tokenizer's limit."""
        self.fast = tokenizer.is_fast
        for adapter in self.adapters.values():
            self._check_fast(adapter.name, adapter.task)
        self.max_context = max_context(self.folder, tokenizer)

    def adapter_task(self, name: str) -> str:
        return self._get(name).task

    def adapter_labels(self, name: str) -> list[str]:
        return self._get(name).labels

    def _get(self, name: str) -> Classifier:
        adapter = self.adapters.get(name)
        if adapter is None:
            raise UnknownAdapter(f"adapter {name!r} is not served; served: {', '.join(self.adapters) or 'none'}")
        return adapter

    # -- loading ------------------------------------------------------------------------------------------------

    def read_adapter(self, name: str, path: str | Path) -> Classifier:
        """Read and check an adapter of another classifier export (OUT2/adapters/NAME.onnx_adapter), changing
        nothing: its head is OUT2's, and its task and labels OUT2/adapters.json's entry for that file."""
        self._free(name)
        path = Path(path)
        adapter = self._check_file(name, path)  # the file itself first: a bad one is said as such, wherever it is
        out = path.parent.parent
        if not (out / MANIFEST_FILE).is_file():
            raise ServeError(f"adapter {name!r}: {path} is not in a classifier export (no {out / MANIFEST_FILE} "
                             "naming its head, task and labels): give OUT/adapters/NAME.onnx_adapter of a "
                             "`lite-sft export` of classifier runs")
        try:
            manifest = read_manifest(out)
        except ServeError as err:
            raise ServeError(f"adapter {name!r}: {err}") from err
        entry = next((e for e in manifest.adapters if (out / e.file).resolve() == path.resolve()), None)
        if entry is None:
            raise ServeError(f"adapter {name!r}: {out / MANIFEST_FILE} lists no adapter in {path.name}")
        theirs, ours = manifest.base.get("digest"), self.manifest.base.get("digest")
        if theirs and ours and theirs != ours:
            raise ServeError(f"adapter {name!r}: {out} was tuned on another base ({manifest.base.get('name_or_path')}"
                             f", weights {theirs}) than this server's ({ours}): serve it from its own export")
        return self._classifier(adapter, out, entry)

    def _classifier(self, adapter: Adapter, out: Path, entry: AdapterEntry) -> Classifier:
        """A checked adapter file (of the export `out`, whose `entry` it is) with its head: the task and labels,
        the head's inputs and logits, checked against this trunk."""
        name, where = adapter.name, out / MANIFEST_FILE
        if adapter.rank != entry.rank or set(adapter.targets) != set(entry.targets):
            raise ServeError(f"adapter {name!r}: {adapter.path} holds rank {adapter.rank} on "
                             f"{', '.join(adapter.targets)}, {where} says rank {entry.rank} on "
                             f"{', '.join(entry.targets)}: export the runs again")
        if entry.task not in CLASSIFIERS:
            raise ServeError(f"adapter {name!r}: {where} says its task is {entry.task!r}; this server serves "
                             f"classifiers ({', '.join(CLASSIFIERS)})")
        labels = check_labels(list(entry.labels or []), entry.task, f"adapter {name!r}: {where} labels")
        if not labels:
            raise ServeError(f"adapter {name!r}: {where} names no labels for it: export the run again")
        self._check_fast(name, entry.task)
        head_file = out / (entry.head or f"{HEADS_DIR}/{Path(adapter.path).stem}.onnx")
        if not head_file.is_file():
            raise ServeError(f"adapter {name!r}: its head graph {head_file} is missing: export the run again")
        try:
            head = open_session(head_file, self.device_name, self.threads)
        except ServeError as err:
            raise ServeError(f"adapter {name!r}: {err}") from err
        reads = [i.name for i in head.get_inputs()]
        logits = {o.name: o for o in head.get_outputs()}.get("logits")
        rank = 3 if TASKS[entry.task].per_token else 2
        unknown = sorted(set(reads) - set(self.outputs) - set(HEAD_TOKENS))
        if unknown or logits is None or len(logits.shape) != rank:
            raise ServeError(f"adapter {name!r}: {head_file} is not a {entry.task} head of this trunk (it reads "
                             f"{', '.join(reads)}; the trunk gives {', '.join(self.outputs)}): export the run again")
        if isinstance(logits.shape[-1], int) and logits.shape[-1] != len(labels):
            raise ServeError(f"adapter {name!r}: {head_file} gives {logits.shape[-1]} logits, {where} names "
                             f"{len(labels)} labels: export the run again")
        return Classifier(name, adapter.rank, adapter.sites, adapter.path, adapter.targets, task=entry.task,
                          labels=labels, head=head, reads=reads, head_file=str(head_file))

    def _check_fast(self, name: str, task: str) -> None:
        if TASKS[task].per_token and not self.fast:
            raise ServeError(f"adapter {name!r} is {task}: /v1/ner maps sub-words back to words with a fast "
                             f"tokenizer's word ids; save the base's tokenizer.json in {self.folder}")

    # -- the call -----------------------------------------------------------------------------------------------

    def logits(self, rows: list[dict], adapters: list[str] | None = None) -> list[np.ndarray]:
        """float32 logits per row from its adapter's head: (labels,) for seq-cls, (the row's tokens, labels) for
        token-cls. Every row names a served adapter."""
        names = list(adapters) if adapters is not None else [None] * len(rows)
        if len(names) != len(rows):
            raise ServeError(f"{len(names)} adapters for {len(rows)} rows")
        served = self.adapters  # one version throughout: a load or unload makes a new dict
        for name in names:
            if name not in served:
                raise UnknownAdapter(f"adapter {name!r} is not loaded" if name is not None else
                                     "a row names no adapter: the trunk has no head of its own, name an adapter")
        out: list = [None] * len(rows)
        for group in length_groups([len(r["input_ids"]) for r in rows], self.pass_tokens):  # short beside long
            part = [rows[i] for i in group]
            for i, logits in zip(group, self._pass(part, [names[i] for i in group], served)):
                out[i] = logits
        return out

    def _pass(self, rows: list[dict], names: list[str], served: dict) -> list[np.ndarray]:
        """One trunk run over `rows`, then each adapter's head on its rows."""
        batch = pad_right(rows, self.pad_id)  # (batch, longest)
        if "token_type_ids" in self.token_inputs and "token_type_ids" not in batch:  # a tokenizer that gives none
            batch["token_type_ids"] = np.zeros_like(batch["input_ids"])
        given = {**batch, **self._trunk(batch, names)}
        out: list = [None] * len(rows)
        for name in dict.fromkeys(names):
            adapter = served[name]
            picked = [i for i, n in enumerate(names) if n == name]
            feed = {key: given[key] if len(picked) == len(rows) else given[key][picked] for key in adapter.reads}
            logits = adapter.head.run(["logits"], feed)[0].astype(np.float32, copy=False)
            for j, i in enumerate(picked):
                out[i] = logits[j, :len(rows[i]["input_ids"])] if TASKS[adapter.task].per_token else logits[j]
        return out

    def _trunk(self, batch: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        """The trunk's outputs for the batch, each row with its adapter's columns: last_hidden_state (batch, seq,
        hidden) and, for a trunk with a pooler, pooler_output (batch, hidden)."""
        binding, bank = self._binding, self.bank
        if self._bound != bank.version:  # the banks are bound once per version, not every call
            for name, tensor in bank.tensors.items():
                binding.bind_input(name, self.device.type, self.device.index or 0, NP_TYPES[tensor.dtype],
                                   tuple(tensor.shape), tensor.data_ptr())
            self._bound = bank.version
        mask = bank.mask(names, NP_TYPES[self.lora_dtype])  # (batch, R)
        for name in self.token_inputs:
            binding.bind_cpu_input(name, batch[name])
        binding.bind_cpu_input(MASK_INPUT, mask)
        binding.clear_binding_outputs()
        for name in self.outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return dict(zip(self.outputs, binding.copy_outputs_to_cpu()))
