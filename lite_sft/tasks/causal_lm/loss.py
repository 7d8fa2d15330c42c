"""The training loss: cross-entropy summed over trained tokens, three ways.

    ce = token_loss_sum(model, batch, device, impl="fused")   # what train.loss picks

- `full`: the model's logits at every position, upcast to fp32, then cross-entropy: what
  transformers and TRL do. Prompt and padding positions cost a full output-layer matmul each and
  hold batch x seq x vocab logits (twice: the upcast and the log-softmax saved for backward).
- `trained`: the backbone's hidden states, then the output layer on trained positions only. With an
  assistant-only loss most positions are prompt; they never reach the output layer.
- `fused`: as `trained`, and the output layer, the loss and its gradient are computed together chunk
  by chunk (`FusedLinearCrossEntropy`), so at most `chunk` x vocab logits exist at once and nothing
  of vocabulary size is kept for backward. Same arithmetic as `trained`, far less memory.

How the hidden states are obtained: the model is called as usual (through any DDP or compile
wrapper, so gradient synchronisation still happens) with its output layer swapped for an identity for
the duration of the call. `check_loss_path` proves on the loaded model that this gives the same loss
as `full` (an architecture that scales or soft-caps its logits would not) before training starts.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from lite_sft.tasks.base import IGNORE_INDEX


# `train.loss_chunk_tokens: 0` holds this many logits per chunk: 128 MiB in fp32; about 1,000 positions
# for a 32k vocabulary, 260 for Llama-3's 128k (a 260 x 4096 x 128k matmul still fills a GPU).
AUTO_CHUNK_LOGITS = 2**25


def chunk_tokens(setting: int, vocab: int) -> int:
    """Positions per chunk of the fused loss: `setting`, or for 0 one sized to the vocabulary."""
    return setting or max(128, min(4096, AUTO_CHUNK_LOGITS // vocab))


def token_loss_sum(model, batch: dict[str, torch.Tensor], device: torch.device, impl: str = "full",
                   chunk: int = 0) -> torch.Tensor:
    """Cross-entropy summed over trained tokens (labels != IGNORE_INDEX), in fp32; `chunk` as in chunk_tokens."""
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = batch.pop("labels")
    targets = labels[:, 1:]
    if impl == "full":
        # use_cache=False matters: with a cache, transformers stops isolating packed examples.
        logits = model(**batch, use_cache=False).logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    head = _inner(model).get_output_embeddings()
    with _output_layer_as_identity(model):
        hidden = model(**batch, use_cache=False).logits[:, :-1]
    trained = targets != IGNORE_INDEX
    hidden, targets = hidden[trained], targets[trained]  # (trained tokens, hidden), (trained tokens,)
    if impl == "fused" and _fusable(head):
        return FusedLinearCrossEntropy.apply(hidden, head.weight, targets, chunk_tokens(chunk, head.out_features))
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T, targets)), with d/d(hidden) computed in the forward pass.

    Written by hand because the fused kernels that do this (Liger's, Apple's cut-cross-entropy) are
    Triton/CUDA only; this one is plain torch and runs on any device. Per chunk of positions: logits,
    log-sum-exp, then softmax - one_hot is the gradient of the loss with respect to the logits, and
    multiplying it by `weight` gives the gradient with respect to `hidden`. Only that (tokens x hidden)
    gradient is kept for backward. `weight` must be frozen (the output layer is not a LoRA target).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # bf16/fp16 logits are upcast, as in `full`
        loss = torch.zeros((), dtype=dtype, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.size(0), chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = (h @ weight.T).to(dtype)
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad is not None:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(t.numel(), device=t.device), t] -= 1
                grad[start:start + chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None


@torch.no_grad()
def check_loss_path(model, device: torch.device, impl: str) -> str:
    """The loss implementation to use on this model: `impl` if it matches `full` here, else `full`.

    One short forward each way on random tokens. A model whose logits are not just the output layer
    applied to the backbone's last hidden state (logit scaling or soft-capping, as in Gemma 2) fails
    the comparison and keeps the plain path.
    """
    if impl == "full":
        return impl
    vocab = _inner(model).config.get_text_config().vocab_size  # the embedding may be wrapped by peft
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, 12), generator=gen)
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    was_training = model.training
    model.eval()
    try:
        reference = token_loss_sum(model, batch, device, "full")
        ours = token_loss_sum(model, batch, device, impl)
    finally:
        model.train(was_training)
    if not torch.allclose(ours, reference, rtol=1e-3, atol=1e-3):
        print(f"train.loss={impl}: {type(_inner(model)).__name__} computes its logits with more than the output "
              f"layer (loss {ours.item():.4f} vs {reference.item():.4f}); using train.loss=full")
        return "full"
    return impl


def _fusable(head) -> bool:
    return type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad


def _inner(model):
    """The model under DDP / torch.compile wrappers (a peft model forwards attribute access itself)."""
    while hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)


@contextmanager
def _output_layer_as_identity(model):
    inner = _inner(model)
    head = inner.get_output_embeddings()
    inner.set_output_embeddings(torch.nn.Identity())
    try:
        yield
    finally:
        inner.set_output_embeddings(head)
