"""Answer prompts with a tuned run: base model + its adapter, unmerged, through `model.generate`.

    lite-sft generate runs/demo --prompt "Write 90210 backwards."

A quick check of what a run learned; production inference goes through export and serve.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .model import load_tuned

RAW_FORMATS = ("prompt_completion", "text")


def answer(run_dir: str | Path, prompts: list[str], *, system: str | None = None, max_new_tokens: int = 128,
           temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """One answer per prompt, in order. Chat-format runs go through the saved chat template."""
    model, tokenizer, cfg = load_tuned(run_dir)
    device = next(model.parameters()).device
    stop_ids = _stop_ids(model, tokenizer)
    torch.manual_seed(seed)
    answers = []
    for prompt in prompts:
        if cfg.data.format in RAW_FORMATS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
        else:
            messages = ([{"role": "system", "content": system or cfg.data.system_prompt}]
                        if (system or cfg.data.system_prompt) else [])
            messages.append({"role": "user", "content": prompt})
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
        ids = ids.to(device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                top_p=top_p if temperature > 0 else None, eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id, use_cache=True,
            )
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def _stop_ids(model, tokenizer) -> list[int]:
    """EOS from the tokenizer and from the generation config (chat models often have several)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)
