"""The options of every command but a tuning run's (that is lite_sft.config): one dataclass per job.

    opts = ExportOptions(quantize="int4")       # lite-sft export RUN --out OUT --quantize int4
    opts.validate()                             # ExportError naming every bad option at once

A field is its flag: `--field-name` (or what its `flag(...)` metadata says), its docstring the flag's --help,
its default the flag's default; lite_sft.cli builds each command's options from these classes. The library
takes the same objects (export_run, bench, build_server), so a setting means the same thing either way.
The `*_CHOICES` tuples are the allowed values; the modules that act on a choice import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config_io import flag
from .errors import ExportError, ServeError

ONNX_DTYPES = ("fp32", "fp16")
QUANTIZE_CHOICES = ("none", "int8", "int4")
EXPORTER_CHOICES = ("auto", "builder", "torch")
MERGE_ONTO = ("dequantized", "original")
BATCHING = ("continuous", "static")
BACKENDS = ("torch-adapter", "torch-merged", "onnx-fp32", "onnx-fp16", "onnx-int8", "onnx-int4")
API_KEY_ENV = "LITE_SFT_API_KEY"


@dataclass
class TuneOptions:
    """How `tune` (and `inspect-data`, `plan`) find their config and treat the run directory."""

    config: Path | None = field(default=None, metadata=flag(short="-c"))
    """YAML config; flags override it."""
    resume: bool = False
    """Continue the run in --output-dir from its newest checkpoint."""
    overwrite: bool = False
    """Replace an existing --output-dir (only once setup has succeeded)."""


@dataclass
class InspectOptions:
    model: str | None = field(default=None, metadata=flag(short="-m"))
    """Model whose tokenizer and chat template to use."""
    examples: int = field(default=3, metadata=flag(short="-n"))
    """How many examples to show."""
    color: bool | None = None
    """Colour trained tokens (default: when printing to a terminal)."""


@dataclass
class PlanOptions:
    device: str = "cuda"
    """Plan a GPU run (cuda) or a CPU one (cpu)."""
    as_json: bool = field(default=False, metadata=flag("--json"))
    """Print one JSON object instead of the table."""


@dataclass
class GenerateOptions:
    prompt: list[str] = field(metadata=flag(short="-p", repeat=True))
    """A user message (repeat for several)."""
    system: str | None = None
    """A system message."""
    max_new_tokens: int | None = field(default=None, metadata=flag(min=1))
    """Most tokens to generate (default 128; a seq2seq run: the setting it saved)."""
    temperature: float = field(default=0.0, metadata=flag(min=0.0))
    """0 for greedy decoding."""
    top_p: float = field(default=1.0, metadata=flag(min=0.0, max=1.0))
    """Nucleus sampling mass."""
    seed: int = 0
    """Seed for sampling."""


@dataclass
class EvalOptions:
    """`lite-sft eval`; the data file's columns, when they differ from the run's, are the run config's fields."""

    data: str = field(metadata=flag(short="-d"))
    """The file to evaluate on, in the run's format."""
    out: Path | None = field(default=None, metadata=flag(short="-o"))
    """Where to write the metrics JSON (default RUN_DIR/eval-<file>.json)."""
    batch_size: int | None = field(default=None, metadata=flag(min=1))
    """Examples per forward pass (default: the run's micro-batch, as its own evaluation used, so the figures match
    training's)."""


@dataclass
class ExportOptions:
    # The command's --out is export_run's second argument, not an option of how to export.
    dtype: str = "fp32"
    """ONNX precision: fp32 or fp16."""
    merged_dtype: str = "auto"
    """Merged model precision: auto (the base's own; 16-bit for QLoRA), fp32, fp16, bf16."""
    quantize: str = "none"
    """Also write a quantised ONNX: none, int8 (dynamic), int4 (weight-only MatMulNBits)."""
    block_size: int = 32
    """int4: input channels per scale (power of two, >= 16)."""
    merge_onto: str = "dequantized"
    """QLoRA runs: `dequantized` (what the adapter was trained against) or `original` (changes the model; warns)."""
    onnx: bool = True
    """Convert the merged model to ONNX (causal-lm and seq2seq with a KV cache)."""
    exporter: str = "auto"
    """ONNX exporter: auto (causal-lm: onnxruntime-genai's model builder where it takes the architecture, else
    torch.onnx), builder or torch."""
    # ONNX gates also run two of the prompts as a left-padded batch.
    parity_prompts: int = field(default=4, metadata=flag(min=1))
    """Held-out prompts the parity gate compares on."""
    parity_tokens: int = field(default=16, metadata=flag(min=1))
    """Greedy tokens generated and compared per prompt (seq2seq: per source)."""
    parity_examples: int | None = field(default=None, metadata=flag(min=2))
    """seq-cls, token-cls, seq2seq: held-out examples the gate compares on (default 32; seq2seq 8)."""
    min_agreement: float | None = None
    """Override every gate's greedy-agreement threshold (0-1)."""
    max_shard_size: str = "5GB"
    """Largest safetensors file of the merged model; bigger models are sharded."""
    names: list[str] | None = field(default=None, metadata=flag("--name", repeat=True))
    """Several runs: RUN=NAME names RUN's adapter (default: the run directory's name); repeat per run."""
    overwrite: bool = False
    """Replace an existing --out (an earlier export), only once the new one has passed."""

    def validate(self) -> None:
        problems = []
        if self.dtype not in ONNX_DTYPES:
            problems.append(f"--dtype {self.dtype!r}: choose one of {', '.join(ONNX_DTYPES)}")
        if self.quantize not in QUANTIZE_CHOICES:
            problems.append(f"--quantize {self.quantize!r}: choose one of {', '.join(QUANTIZE_CHOICES)}")
        if self.quantize != "none" and not self.onnx:
            problems.append(f"--quantize {self.quantize} quantises the ONNX graph: drop --no-onnx")
        elif self.quantize == "int8" and self.dtype != "fp32":
            problems.append("--quantize int8 starts from the fp32 ONNX graph: use --dtype fp32")
        if self.exporter not in EXPORTER_CHOICES:
            problems.append(f"--exporter {self.exporter!r}: choose one of {', '.join(EXPORTER_CHOICES)}")
        if self.merge_onto not in MERGE_ONTO:
            problems.append(f"--merge-onto {self.merge_onto!r}: choose one of {', '.join(MERGE_ONTO)}")
        if self.quantize == "int4" and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            problems.append(f"--block-size {self.block_size}: a power of two, at least 16")
        if self.parity_prompts < (2 if self.onnx else 1):
            problems.append(f"--parity-prompts {self.parity_prompts}: at least 2 (ONNX also runs two as a batch)"
                            if self.onnx else f"--parity-prompts {self.parity_prompts}: at least 1")
        if self.parity_examples is not None and self.parity_examples < 2:
            problems.append(f"--parity-examples {self.parity_examples}: at least 2 (ONNX also runs them as a batch)")
        if self.parity_tokens < 1:
            problems.append(f"--parity-tokens {self.parity_tokens}: at least 1")
        if self.min_agreement is not None and not 0 <= self.min_agreement <= 1:
            problems.append(f"--min-agreement {self.min_agreement}: a fraction between 0 and 1")
        if problems:
            raise ExportError("invalid export options:\n  " + "\n  ".join(problems))


@dataclass
class ExportTarget:
    out: Path = field(metadata=flag(short="-o"))
    """Output folder: merged/, onnx/, onnx-int8|int4/, parity.json."""


@dataclass
class ServeOptions:
    """Where and how `lite-sft serve` loads the model and listens (build_server's keywords beside the settings)."""

    host: str = "127.0.0.1"
    """Address to listen on; 0.0.0.0 opens it to the network."""
    port: int = field(default=8000, metadata=flag(short="-p", min=0, max=65535))
    """Port to listen on (0: any free one)."""
    device: str = "auto"
    """auto (CUDA when onnxruntime and torch see a GPU), cpu or cuda."""
    variant: str | None = None
    """In an export OUT: fp (onnx/), int8 (onnx-int8/) or int4 (onnx-int4/); default: the quantised variant the
    export made and gated, else fp."""
    model_name: str | None = None
    """Name in /v1/models (default: the folder's name)."""
    threads: int | None = field(default=None, metadata=flag(min=1))
    """CPU threads for the model (default: onnxruntime's, one per core)."""
    log_level: str = "info"
    """uvicorn's log level."""


@dataclass
class ServerSettings:
    model_name: str
    """The name /v1/models lists and requests may give as `model`."""
    api_key: str | None = field(default=None, metadata=flag(envvar=API_KEY_ENV))
    """Require `Authorization: Bearer KEY` on /v1/*. Prefer setting LITE_SFT_API_KEY: a flag's value shows in `ps`
    to every local user."""
    timeout_s: float = field(default=60.0, metadata=flag("--timeout", min=0.1))
    """Seconds a request may take, queueing included (then 504)."""
    default_max_tokens: int = field(default=256, metadata=flag(min=1))
    """Chat requests without max_tokens stop here."""
    # Never past the model's own context either.
    max_context: int | None = field(default=None, metadata=flag(min=2))
    """Cap prompt + output tokens below the model's context."""
    max_batch: int = field(default=8, metadata=flag(min=1))
    """Most rows (requests x n) run together in one batch."""
    max_queue: int = field(default=32, metadata=flag(min=1))
    """Requests waiting beyond this are answered 429."""
    batching: str = "continuous"
    """continuous: a request joins the running batch at the next step; static: each batch runs to its end (seq2seq
    always)."""

    def __post_init__(self) -> None:
        if self.batching not in BATCHING:
            raise ServeError(f"--batching {self.batching!r}: choose one of {', '.join(BATCHING)}")


@dataclass
class BenchOptions:
    # List fields are comma-separated text on the command line.
    prompt_lens: list[int] = field(default_factory=lambda: [32, 128])
    """Prompt lengths in tokens (an encoder classifier's sequence lengths), comma-separated."""
    output_lens: list[int] = field(default_factory=lambda: [32, 128])
    """Generated tokens per run, comma-separated."""
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    """Prompts per batch, comma-separated."""
    runs: int = field(default=10, metadata=flag(min=1))
    """Timed runs per shape (percentiles over these)."""
    warmup: int = field(default=2, metadata=flag(min=0))
    """Untimed runs first."""
    device: str = "auto"
    """auto, cpu or cuda."""
    threads: int | None = field(default=None, metadata=flag(min=1))
    """CPU threads for every backend (default: OMP_NUM_THREADS / torch's)."""
    backends: list[str] | None = None
    """Comma-separated: torch-adapter, torch-merged, onnx-fp32, onnx-fp16, onnx-int8, onnx-int4 (default: all
    found)."""
    seed: int = 0
    """Seed for the prompts' random tokens."""

    def validate(self) -> None:
        problems = []
        for name in ("prompt_lens", "output_lens", "batch_sizes"):
            if not getattr(self, name) or min(getattr(self, name)) < 1:
                problems.append(f"{name.replace('_', '-')}: positive integers")
        if self.output_lens and min(self.output_lens) < 2:
            problems.append("output-lens: at least 2 (decode speed needs a second token)")
        if self.runs < 1 or self.warmup < 0:
            problems.append("runs at least 1, warmup at least 0")
        unknown = set(self.backends or []) - set(BACKENDS)
        if unknown:
            problems.append(f"backends {sorted(unknown)}: choose from {', '.join(BACKENDS)}")
        if problems:
            raise ServeError("invalid bench options: " + "; ".join(problems))


@dataclass
class BenchRun:
    """`lite-sft bench`'s own flags beside BenchOptions: the table's shape shortcut, where it goes, and the load
    test against a running server (--url)."""

    url: str | None = None
    """Load-test the server running here instead (e.g. http://127.0.0.1:8000)."""
    quick: bool = False
    """A short table: prompt 16, output 32, 5 runs, 1 warm-up."""
    out: Path = field(default=Path("bench-results"), metadata=flag(short="-o"))
    """Folder for serve-<time>.json and .png."""
    concurrency: int = field(default=4, metadata=flag(min=1))
    """--url: concurrent clients."""
    duration: float = field(default=20.0, metadata=flag(min=0.1))
    """--url: seconds to keep sending requests."""
    max_tokens: int = field(default=32, metadata=flag(min=1))
    """--url: tokens per request."""
    min_tokens: int | None = field(default=None, metadata=flag(min=1))
    """--url: each request asks a length drawn from min..max tokens."""
    api_key: str | None = field(default=None, metadata=flag(envvar=API_KEY_ENV))
    """--url: the server's API key."""
