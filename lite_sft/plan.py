"""Estimate peak training memory from a config, before loading anything heavy.

    lite-sft plan --model Qwen/Qwen2.5-0.5B --quant 4bit --max-seq-len 2048 --gpu-memory 8GB
    plan = estimate(cfg)                                 # MemoryPlan: bytes per component
    print(plan.table())
    micro, accum = pick_batch(cfg, parse_size("8GB"))    # the largest micro-batch that fits

No weights are read: the config comes from AutoConfig and the model is built on the meta device, so
parameters are counted exactly, module by module, for any architecture. Activations are modelled on a
Llama-style decoder layer (RMSNorm, attention through SDPA, gated MLP) with peft LoRA adapters: each term
below names the tensors autograd keeps for backward. tests/test_plan.py checks the activation terms
against the tensors autograd really saves, and the whole step against a measured peak.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import dataclass

import torch

from .config import ConfigError, RunConfig
from .tasks.causal_lm.loss import chunk_tokens
from .model import ModelError, compute_dtype, resolve_model_path

MiB, GiB = 2**20, 2**30

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)

# peft keeps adapter weights in fp32 whatever the base's dtype, and casts each adapter's input to it.
ADAPTER_BYTES = 4
# NF4 packs two weights a byte; double quantisation stores each block of 64 weights' scale as one byte,
# plus one fp32 scale per 256 of those.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# Logits and loss per position: cross-entropy's backward holds the saved fp32 log-softmax, its incoming
# gradient and its output gradient at once, vocab-wide (the forward holds no more: the compute-dtype
# logits, their fp32 upcast and the log-softmax, with the first freed once upcast in 16-bit).
LOSS_BYTES_PER_LOGIT = 3 * 4
CUDA_CONTEXT = GiB // 2   # CUDA context, cuBLAS workspace and kernels: outside torch's allocator
FRAGMENTATION = 0.10      # the caching allocator reserves more than it hands out

# The projections of a Llama-style layer, by the tensor they read: q, k and v read one normed hidden
# state, gate and up another; o reads the attention output and down the MLP product.
_READS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
          "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid"}


def parse_size(text: str | int) -> int:
    """Bytes in `text`: `8GB` and `7.5G` are decimal (10^9), `8GiB` binary (2^30), `512MB`, or plain bytes."""
    match = _SIZE.fullmatch(str(text))
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if unit is None:
        raise ValueError(f"{text!r} is not a size: write a number with an optional unit, e.g. 8GB, 8GiB, 7.5G, "
                         "512MB or plain bytes (GB = 10^9 bytes, GiB = 2^30)")
    size = int(float(match.group(1)) * unit)
    if size <= 0:
        raise ValueError(f"{text!r}: a size must be more than 0 bytes")
    return size


def format_size(size: int) -> str:
    """2.15 GiB, or 310.4 MiB below a GiB."""
    return f"{size / GiB:.2f} GiB" if size >= GiB else f"{size / MiB:.1f} MiB"


@dataclass
class MemoryPlan:
    """What each part of a training step adds to its peak memory, in bytes.

    The peak is at the loss, when the forward pass has kept everything backward needs; with gradient
    checkpointing it may instead be a layer's recompute, which `activations` then includes.
    """

    weights: int
    adapter: int
    activations: int
    logits: int
    overhead: int
    device: str
    dtype: str
    micro_batch_size: int
    tokens: int  # per micro-batch: packed rows are full, so micro_batch_size x max_seq_len
    gradient_checkpointing: bool
    loss: str
    base_params: int
    quantised_params: int
    adapter_params: int
    details: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.weights + self.adapter + self.activations + self.logits + self.overhead

    def rows(self) -> list[tuple[str, int, str]]:
        """(component, bytes, what it counts), in table order."""
        names = ("weights", "adapter", "activations", "logits", "overhead")
        return [(name, getattr(self, name), self.details.get(name, "")) for name in names]

    def table(self) -> str:
        unit, scale = ("GiB", GiB) if self.total_bytes >= GiB else ("MiB", MiB)
        lines = [f"{'component':<12} {unit:>8}  what"]
        lines += [f"{name:<12} {size / scale:>8.2f}  {what}" for name, size, what in self.rows()]
        lines.append(f"{'total':<12} {self.total_bytes / scale:>8.2f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes}


def estimate(cfg: RunConfig, *, micro_batch_size: int | None = None, device: str | torch.device = "cuda") -> MemoryPlan:
    """Peak memory of one training step of `cfg` on `device` (cuda or cpu), without loading weights."""
    return _plan(cfg, _count_for(cfg), micro_batch_size or cfg.train.micro_batch_size, torch.device(device).type)


def pick_batch(cfg: RunConfig, budget_bytes: int, device: str | torch.device = "cuda") -> tuple[int, int]:
    """(micro_batch_size, grad_accum): the largest micro-batch whose estimate fits `budget_bytes`.

    Candidates are the divisors of the configured rows per optimiser step (micro_batch_size x grad_accum),
    largest first, so the effective batch stays exactly as configured: 16 rows per step become 16 x 1,
    8 x 2, 4 x 4, 2 x 8 or 1 x 16.
    """
    kind = torch.device(device).type
    model = _count_for(cfg)
    rows = cfg.train.micro_batch_size * cfg.train.grad_accum
    for micro in sorted((d for d in range(1, rows + 1) if rows % d == 0), reverse=True):
        if _plan(cfg, model, micro, kind).total_bytes <= budget_bytes:
            return micro, rows // micro
    need = _plan(cfg, model, 1, kind)
    fixes = [fix for fix, useful in (
        ("--quant 4bit", cfg.model.quant != "4bit"),
        ("--gradient-checkpointing", not cfg.model.gradient_checkpointing),
        ("--loss fused", cfg.train.loss != "fused"),
        (f"a shorter --max-seq-len (now {cfg.data.max_seq_len})", True),
        ("a bigger GPU", kind == "cuda")) if useful]
    biggest = max(need.rows(), key=lambda row: row[1])
    raise ConfigError(f"even a micro-batch of 1 row ({cfg.data.max_seq_len} tokens) needs about "
                      f"{format_size(need.total_bytes)}, more than the {format_size(budget_bytes)} budget "
                      f"({biggest[0]} alone {format_size(biggest[1])}); to fit, try " + ", ".join(fixes))


def report(cfg: RunConfig, device: str = "cuda", budget: int | None = None) -> tuple[dict, str]:
    """What `lite-sft plan` prints: (the JSON object, the table), for the run with gradient checkpointing
    as configured, both totals (off and on) for comparison, and with `budget` the micro-batch that fits."""
    plans = {on: estimate(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, gradient_checkpointing=on)),
                          device=device) for on in (False, True)}
    picked = pick_batch(cfg, budget, device) if budget is not None else None
    fit = estimate(cfg, micro_batch_size=picked[0], device=device) if picked else None
    chosen = plans[cfg.model.gradient_checkpointing]
    summary = {"model": cfg.model.name_or_path, **chosen.to_dict(),
               "total_bytes_without_checkpointing": plans[False].total_bytes,
               "total_bytes_with_checkpointing": plans[True].total_bytes,
               "budget_bytes": budget,
               "auto_batch": None if picked is None else {"micro_batch_size": picked[0], "grad_accum": picked[1],
                                                          "total_bytes": fit.total_bytes}}
    lines = [f"{cfg.model.name_or_path} on {device}: {chosen.dtype}, quant {cfg.model.quant}, micro-batch "
             f"{chosen.micro_batch_size} x {cfg.data.max_seq_len} tokens, loss {cfg.train.loss}\n",
             chosen.table(),
             f"\npeak without gradient checkpointing {format_size(plans[False].total_bytes)}, "
             f"with {format_size(plans[True].total_bytes)}"]
    if picked:
        lines.append(f"budget {format_size(budget)}: micro-batch {picked[0]} x grad-accum {picked[1]} "
                     f"({picked[0] * picked[1]} rows per step), estimated {format_size(fit.total_bytes)}")
    return summary, "\n".join(lines)


def default_budget(device: str | torch.device = "cuda") -> int:
    """The GPU's total memory on cuda, the machine's RAM on cpu."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("no CUDA GPU here to take the memory budget from: give one with --gpu-memory "
                              "(train.memory_budget), e.g. 24GB")
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory
    try:
        import psutil

        return psutil.virtual_memory().total
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class _Model:
    """What the estimate needs from the model, counted on the meta device."""

    params: int                 # every parameter, tied ones once
    quantisable: int            # weights bitsandbytes quantises: every linear layer but the output head
    quantised_rows: int         # their output features (8-bit keeps one fp32 scale per row)
    largest: int                # the biggest of them: dequantised whole while it multiplies
    adapted: tuple[tuple[str, int, int], ...]  # (module name, in, out) of every LoRA target
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


def _count_for(cfg: RunConfig) -> _Model:
    path = resolve_model_path(cfg.model.name_or_path)
    return _count(path, cfg.model.trust_remote_code, tuple(cfg.lora.target_modules))


@functools.lru_cache(maxsize=8)
def _count(path: str, trust_remote_code: bool, targets: tuple[str, ...]) -> _Model:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with init_empty_weights():  # parameters on the meta device: shapes without memory
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"could not read the model config of {path}: {err}") from err
    head = model.get_output_embeddings()
    linears = []
    for name, module in model.named_modules():
        if module is head:
            continue
        if isinstance(module, torch.nn.Linear):
            linears.append((name, module.in_features, module.out_features))
        elif isinstance(module, Conv1D):  # GPT-2's linear layers, weight stored (in, out)
            linears.append((name, *module.weight.shape))
    # peft's rule: `all-linear` is every linear layer but the output head; a name matches a module
    # whose dotted path is that name or ends with it.
    if list(targets) == ["all-linear"]:
        adapted = linears
    else:
        adapted = [m for m in linears if any(m[0] == t or m[0].endswith("." + t) for t in targets)]
    text = config.get_text_config()
    heads = text.num_attention_heads
    return _Model(
        params=sum(p.numel() for p in model.parameters()),
        quantisable=sum(i * o for _, i, o in linears),
        quantised_rows=sum(o for _, _, o in linears),
        largest=max((i * o for _, i, o in linears), default=0),
        adapted=tuple(adapted),
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=head.out_features if head is not None else text.vocab_size,
    )


def _dtype(cfg: RunConfig, device: str) -> torch.dtype:
    # Planning a GPU run on a machine without one: assume bfloat16, as any recent GPU computes in. On a
    # CPU `auto` means fp32 weights; where the CPU has native bf16, training then runs under bf16
    # autocast, which this estimate does not model (it plans fp32 activations).
    if device == "cuda" and cfg.model.dtype == "auto" and not torch.cuda.is_available():
        return torch.bfloat16
    return compute_dtype(cfg.model, torch.device(device))


def _plan(cfg: RunConfig, m: _Model, micro: int, device: str) -> MemoryPlan:
    dtype = _dtype(cfg, device)
    c = dtype.itemsize
    seq = cfg.data.max_seq_len
    tokens = micro * seq

    # Weights: bitsandbytes quantises the linear layers; embeddings, output head, norms and biases stay
    # in the compute dtype. A quantised layer is dequantised whole while it multiplies, one at a time.
    quant = cfg.model.quant
    rest = (m.params - m.quantisable) * c
    if quant == "4bit":
        weights = int(m.quantisable * NF4_BYTES_PER_PARAM) + rest + m.largest * c
    elif quant == "8bit":
        weights = m.quantisable + 4 * m.quantised_rows + rest + m.largest * c
    else:
        weights = m.params * c

    # Adapter: r x (in + out) per module (DoRA adds a magnitude per output), each parameter with its fp32
    # weight and gradient and the optimiser's two moments (fp32 for AdamW, 8-bit for paged_adamw_8bit).
    r = cfg.lora.r
    adapter_params = sum(r * (i + o) + (o if cfg.lora.use_dora else 0) for _, i, o in m.adapted)
    moments = 2 if cfg.train.optimizer == "paged_adamw_8bit" else 8
    adapter = adapter_params * (2 * ADAPTER_BYTES + moments)

    # Logits: `full` and `trained` hold them at every position (`trained` only where labels are trained,
    # but a packed row can be all trained tokens). `fused` holds one chunk of positions at a time, plus
    # the last hidden states at the trained positions (a selected copy) and their gradient, which the
    # fused loss computes in its forward pass and keeps for backward.
    if cfg.train.loss == "fused":
        positions = min(chunk_tokens(cfg.train.loss_chunk_tokens, m.vocab), tokens)
        logits = positions * m.vocab * LOSS_BYTES_PER_LOGIT + 2 * tokens * m.hidden * c
    else:
        positions = tokens
        logits = positions * m.vocab * LOSS_BYTES_PER_LOGIT

    per_layer = _layer_bytes(cfg, m, c, seq, device)
    # Shared by every layer: rotary cos and sin. The final RMSNorm keeps its fp32 input like the layers'
    # norms do, while the first layer's first norm keeps nothing (its input, the frozen embeddings'
    # output, needs no gradient): 2 x layers norms in all.
    shared = 2 * m.head_dim * c
    if cfg.model.gradient_checkpointing:
        # Each layer keeps only its input (one hidden state), and the checkpoints the boolean attention
        # mask. Backward recomputes one layer at a time and holds its full activations, plus the
        # gradients in flight through it (about two of its widest, MLP-sized, tensors), but only after
        # the loss's backward has freed the logits: the recompute adds what exceeds them.
        recompute = tokens * (per_layer + 2 * c * m.intermediate)
        activations = tokens * (m.layers * c * m.hidden + shared) + micro * seq * seq + max(0, recompute - logits)
    else:
        activations = tokens * (m.layers * per_layer + shared)

    overhead = 0  # on CPU nothing outside the tensors grows with the run
    if device == "cuda":
        overhead = CUDA_CONTEXT + int(FRAGMENTATION * (weights + adapter + activations + logits))

    name = str(dtype).removeprefix("torch.")
    quantised = {"4bit": "NF4", "8bit": "int8"}.get(quant, name)
    details = {
        "weights": f"{m.params / 1e6:,.1f}M params, {m.quantisable / 1e6:,.1f}M of them in linear layers as {quantised}"
                   + (f", the rest {name}" if quant != "none" else ""),
        "adapter": f"{adapter_params / 1e6:,.2f}M LoRA params (r {r}{', DoRA' if cfg.lora.use_dora else ''}) "
                   f"x {2 * ADAPTER_BYTES + moments} B: fp32 weight, gradient, {cfg.train.optimizer} state",
        "activations": f"{m.layers} layers x {micro} x {seq} tokens, "
                       f"gradient checkpointing {'on' if cfg.model.gradient_checkpointing else 'off'}",
        "logits": f"loss {cfg.train.loss}: {positions:,} positions x {m.vocab:,} vocab x {LOSS_BYTES_PER_LOGIT} B"
                  + (", last hidden states and their gradient" if cfg.train.loss == "fused" else ""),
        "overhead": "CUDA context 0.5 GiB + 10% allocator margin" if device == "cuda" else "none on CPU",
    }
    return MemoryPlan(weights=weights, adapter=adapter, activations=int(activations), logits=logits,
                      overhead=overhead, device=device, dtype=name, micro_batch_size=micro, tokens=tokens,
                      gradient_checkpointing=cfg.model.gradient_checkpointing, loss=cfg.train.loss,
                      base_params=m.params, quantised_params=m.quantisable if quant != "none" else 0,
                      adapter_params=adapter_params, details=details)


def _layer_bytes(cfg: RunConfig, m: _Model, c: int, seq: int, device: str) -> float:
    """Bytes per token that one decoder layer keeps for backward (the average layer, adapters included).

    Frozen layers keep no input (their weight gradient is never computed); what is kept is what a
    trainable adapter, a nonlinearity or the attention kernel needs to send gradients back through.
    """
    a = ADAPTER_BYTES
    h, i, q_dim = m.hidden, m.intermediate, m.heads * m.head_dim
    attn = cfg.model.attn_implementation
    # RMSNorm upcasts its input to fp32 and keeps it, with one fp32 scale per token; two norms a layer.
    per_token = 2 * (4 * h + 4)
    # Attention keeps q, k, v, its output and an fp32 log-sum-exp per head. Training rows carry a mask
    # (packed segments or padding), so transformers repeats k and v to every query head (SDPA's own
    # grouped-query path needs mask-free attention) and SDPA turns the boolean mask into a compute-dtype
    # copy, which each layer keeps. flash_attention_2 takes the segments without a mask.
    kv_dim = m.kv_heads * m.head_dim if attn == "flash_attention_2" else q_dim
    per_token += c * (2 * q_dim + 2 * kv_dim) + 4 * m.heads
    if attn != "flash_attention_2":
        per_token += c * seq
    if attn == "eager":  # the attention probabilities: fp32 softmax and its compute-dtype copy
        per_token += m.heads * seq * (4 + c)
    # MLP: SiLU keeps its input (gate), the product keeps both factors (silu(gate), up).
    per_token += 3 * c * i
    if cfg.model.quant == "8bit":  # bitsandbytes' int8 matmul keeps its input: q/k/v's, gate/up's, down's
        per_token += c * (2 * h + i)

    # The adapters' inputs. Modules reading one tensor (q, k, v) share it when nothing needs copying;
    # otherwise each keeps its own: peft casts the input to fp32 per module, and dropout (one per
    # module) keeps its output and mask (a bool on CUDA, a float on CPU).
    readers: dict[tuple[str, str], list[int]] = {}  # (where, what it reads) -> [modules, input width]
    for name, d_in, _ in m.adapted:
        parent, _, leaf = name.rpartition(".")
        key = (parent, _READS[leaf]) if leaf in _READS else (name, "own")
        readers.setdefault(key, [0, d_in])[0] += 1
    adapters = 0.0
    for (_, reads), (n, d) in readers.items():
        kept = reads == "attn_out" or (cfg.model.quant == "8bit" and reads != "own")  # counted above
        if cfg.lora.dropout > 0:
            adapters += n * d * (a + (1 if device == "cuda" else a))
        elif c != a:
            adapters += n * d * a
        elif not kept:
            adapters += d * c
    for _, _, d_out in m.adapted:
        adapters += a * cfg.lora.r  # LoRA A's output, kept by LoRA B
        if cfg.lora.use_dora:  # DoRA rescales the base output and the adapter output: both kept
            adapters += d_out * (c + a)
    return per_token + adapters / m.layers
