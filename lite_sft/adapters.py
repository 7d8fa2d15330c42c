"""The on-disk contract of a multi-adapter export: one base graph whose LoRA weights are inputs, one adapter file
per run, and a manifest that names them. Export writes it, serving reads it; neither knows the other.

    lite-sft export runs/sentiment runs/support --out exports/team     # OUT/onnx/ + OUT/adapters/ + adapters.json

The graph (OUT/onnx/model.onnx) is the base model's, with a LoRA branch beside every projection some adapter
trains (a *site*, named `layers.{i}.{module}`, e.g. `layers.0.q_proj`):

    y = x @ W  +  ((x @ lora.{site}.A) * lora_mask[:, None, :]) @ lora.{site}.B

    lora.{site}.A   (in, R)   float, the io dtype     every loaded adapter's A, side by side
    lora.{site}.B   (R, out)  float                   every loaded adapter's B (its scale folded in), stacked
    lora_mask       (batch, R)                        1 on the columns of the adapter each row asked for, else 0

So the shared base matmuls run once for the whole batch, each row's delta uses only its own adapter's columns, and
an adapter with another rank or other targets is just other columns (zeros where it trains no module). Rows of a
base-only request have an all-zero mask. R is dynamic: a server loads or drops adapters by feeding other banks.
Why a mask and not a gather of per-row weights: the bank stays one constant tensor per site (bound once), the
step's only new input is the (batch, R) mask, and x @ A over R columns costs a few per cent of the base matmul.

Classifiers (seq-cls, token-cls) of one base share its trunk the same way (export/encoder_lora.py): OUT/onnx/ is
the trunk (BertModel, ...) with branches at sites named by module path inside it
(`encoder.layer.0.attention.self.query`), giving last_hidden_state (and pooler_output); each adapter adds its head
graph, OUT/heads/NAME.onnx, which reads those and gives the run's logits; its entry names its task and labels.

An adapter file (OUT/adapters/NAME.onnx_adapter) is onnxruntime's adapter format holding, for each site the run
trains, `lora.{site}.A` (in, r) and `lora.{site}.B` (r, out), already scaled (alpha / r, or alpha / sqrt(r)).
The manifest (OUT/adapters.json, MANIFEST_FILE) lists the sites with their sizes and every adapter: name, file,
rank, targets, source run, and its export gate. This module is core: onnxruntime is imported only to read or
write an adapter file.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ServeError

MANIFEST_FILE = "adapters.json"
ADAPTERS_DIR = "adapters"
ADAPTER_SUFFIX = ".onnx_adapter"
HEADS_DIR = "heads"  # a multi-adapter encoder export's head graphs, one per adapter
MASK_INPUT = "lora_mask"
FORMAT_VERSION = 1
# peft's key of one LoRA matrix: ...layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight
PEFT_KEY = re.compile(r"layers\.(\d+)\.(?:[A-Za-z_]+\.)?([A-Za-z_0-9]+)\.lora_([AB])(?:\.default)?\.weight$")


def site_name(layer: int, module: str) -> str:
    return f"layers.{layer}.{module}"


def site_targets(sites) -> list[str]:
    """The modules some sites train, as /v1/models and the manifest list them: a site's path without the layer
    (q_proj of layers.0.q_proj; attention.self.query of encoder.layer.0.attention.self.query; pooler.dense)."""
    return sorted({re.sub(r"^.*?\.\d+\.", "", site) for site in sites})


def input_names(site: str) -> tuple[str, str]:
    """The graph inputs of a site's A and B banks."""
    return f"lora.{site}.A", f"lora.{site}.B"


@dataclass
class Site:
    name: str
    """layers.{i}.{module}"""
    fan_in: int
    fan_out: int


@dataclass
class AdapterEntry:
    name: str
    """What /v1/models lists and a request's `model` picks (by default the run directory's name)."""
    file: str
    """Relative to OUT: adapters/NAME.onnx_adapter."""
    rank: int
    alpha: float
    scale: float
    """Folded into B: alpha / rank (alpha / sqrt(rank) with rsLoRA)."""
    targets: list[str]
    """The modules it trains (q_proj, v_proj, ...)."""
    run_dir: str = ""
    task: str = "causal-lm"
    gate: dict = field(default_factory=dict)
    """Its export gate: base graph + this adapter against the run's merged PyTorch model."""
    stop_ids: list[int] | None = None
    """The run's stop ids where they differ from the base's (base["stop_ids"]); None: the base's."""
    rslora: bool = False
    """Its scale is alpha / sqrt(rank) (rsLoRA)."""
    labels: list[str] | None = None
    """A classifier's (seq-cls, token-cls) labels in id order, its run's id2label; None for a causal-lm adapter."""
    head: str | None = None
    """A classifier's head graph, relative to OUT: heads/NAME.onnx (export/encoder_lora.py); None for causal-lm."""


@dataclass
class Manifest:
    base: dict
    """name_or_path, weights digest, quant: what every adapter was trained on."""
    sites: list[Site]
    adapters: list[AdapterEntry]
    format: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def write_manifest(out: Path, manifest: Manifest) -> Path:
    path = Path(out) / MANIFEST_FILE
    path.write_text(manifest.to_json())
    return path


def read_manifest(out: Path) -> Manifest:
    """OUT/adapters.json, checked field by field: a malformed file is one ServeError naming it."""
    path = Path(out) / MANIFEST_FILE
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {raw.get('format')!r}, this lite-sft reads {FORMAT_VERSION}")
        sites = [Site(**s) for s in raw["sites"]]
        adapters = [AdapterEntry(**a) for a in raw["adapters"]]
        return Manifest(raw["base"], sites, adapters)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ServeError(f"{path} cannot be read ({type(err).__name__}: {err}); export the runs again "
                         "(`lite-sft export RUN_A RUN_B --out OUT`)") from err


def peft_sites(state: dict, scale: float) -> dict[str, dict]:
    """{site: {"A": (in, r), "B": (r, out) scaled}} as numpy float32, from a peft adapter's state dict (keys as
    adapter_model.safetensors holds them). A key that is not a layer's LoRA matrix raises ValueError naming it."""
    pairs: dict[str, dict] = {}
    for key, tensor in state.items():
        match = PEFT_KEY.search(key)
        if match is None:
            raise ValueError(f"{key}: not a LoRA matrix of a decoder layer (layers.N.MODULE.lora_A/B)")
        layer, module, which = int(match.group(1)), match.group(2), match.group(3)
        value = tensor.detach().float().cpu().numpy()
        # peft stores lora_A as (r, in) and lora_B as (out, r): the graph multiplies x (.., in) on the left
        pairs.setdefault(site_name(layer, module), {})[which] = value.T.copy() if which == "A" else (value.T * scale)
    for site, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{site}: the adapter has lora_{''.join(sorted(pair))} without its pair")
    return pairs


# peft's key of a LoRA matrix of any module: base_model.model.{module path}.lora_{A|B}[.default].weight
PEFT_MODULE_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$")


def peft_trunk_sites(state: dict, scale: float, prefix: str) -> tuple[dict[str, dict], list[str]]:
    """A classifier's LoRA matrices inside its trunk (the module `prefix`, transformers' base_model_prefix: bert,
    roberta, ...) as {site: {"A": (in, r), "B": (r, out) scaled}}, sites named by module path inside the trunk
    (encoder.layer.0.attention.self.query); and the keys of everything else in `state` (LoRA outside the trunk, a
    head saved whole), which the export folds into the run's head graph."""
    pairs: dict[str, dict] = {}
    outside = []
    for key, tensor in state.items():
        match = PEFT_MODULE_KEY.match(key)
        if match is None or not match.group(1).startswith(prefix + "."):
            outside.append(key)
            continue
        site, which = match.group(1)[len(prefix) + 1:], match.group(2)
        value = tensor.detach().float().cpu().numpy()
        pairs.setdefault(site, {})[which] = value.T.copy() if which == "A" else (value.T * scale)
    for site, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{site}: the adapter has lora_{''.join(sorted(pair))} without its pair")
    return pairs, outside


def write_adapter_file(path: Path, sites: dict[str, dict]) -> Path:
    """An onnxruntime adapter file holding each site's A and B under its graph input names."""
    import numpy as np
    import onnxruntime as ort

    params = {}
    for site, pair in sites.items():
        a_name, b_name = input_names(site)
        params[a_name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(pair["A"], dtype=np.float32))
        params[b_name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(pair["B"], dtype=np.float32))
    writer = ort.AdapterFormat()
    writer.set_adapter_version(FORMAT_VERSION)
    writer.set_model_version(FORMAT_VERSION)
    writer.set_parameters(params)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    writer.export_adapter(str(path))
    return Path(path)


def read_adapter_file(path: Path) -> dict[str, dict]:
    """{site: {"A": (in, r), "B": (r, out)}} as numpy float32 copies, from an onnxruntime adapter file. A missing or
    corrupt file, or one whose A and B do not pair up, is one ServeError naming it."""
    import numpy as np
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ServeError(f"{path}: no such adapter file")
    try:
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    except Exception as err:  # noqa: BLE001  (onnxruntime raises its own types for a corrupt file)
        raise ServeError(f"{path} is not an onnxruntime adapter file ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from err
    sites: dict[str, dict] = {}
    for name, value in params.items():
        match = re.fullmatch(r"lora\.(.+)\.([AB])", name)
        if match is None:
            raise ServeError(f"{path}: parameter {name!r} is not a LoRA bank (lora.SITE.A or lora.SITE.B)")
        sites.setdefault(match.group(1), {})[match.group(2)] = np.array(value.numpy(), dtype=np.float32)
    for site, pair in sites.items():
        if set(pair) != {"A", "B"} or pair["A"].ndim != 2 or pair["B"].ndim != 2 \
                or pair["A"].shape[1] != pair["B"].shape[0]:
            raise ServeError(f"{path}: site {site} needs A (in, r) and B (r, out) with the same r")
    if not sites:
        raise ServeError(f"{path} holds no LoRA weights")
    return sites
