"""Answer prompts with a tuned run: base model + its adapter, unmerged, through `model.generate`.

    lite-sft generate runs/demo --prompt "Write 90210 backwards."

A quick check of what a run learned; production inference goes through export and serve.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .artifacts import ADAPTER_CONFIG, GENERATION_CONFIG, run_task
from .errors import ModelError, ServeError
from .model import load_tuned
from .stops import stop_ids_for
from .taskspec import TASKS

RAW_FORMATS = ("prompt_completion", "text")


def answer(run_dir: str | Path, prompts: list[str], *, system: str | None = None, max_new_tokens: int | None = None,
           temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """One answer per prompt, in order. Chat-format runs go through the saved chat template; a seq2seq run
    takes each prompt as its source text."""
    try:  # a folder without an adapter is refused by load_tuned below, with its own message
        spec = TASKS[run_task(run_dir) if (Path(run_dir) / ADAPTER_CONFIG).is_file() else "causal-lm"]
    except ServeError as err:
        raise ModelError(str(err)) from err
    if not spec.generates:
        raise ModelError(f"{run_dir} is a {spec.name} run: it labels text rather than writing it. Score it with "
                         f"`lite-sft eval {run_dir} --data FILE`, or export it and POST to the server's {spec.routes[0]}")
    from transformers.utils import logging as hf_logging

    # transformers 5 draws a "Loading weights" bar per load, which would land in front of the answer; the base
    # is already local here (tune fetched it), so no download bar is lost with it.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model, tokenizer, cfg = load_tuned(run_dir)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    device = next(model.parameters()).device
    if spec.name == "seq2seq":  # its saved generation settings decide what the caller leaves unset
        return _transduce(model, tokenizer, run_dir, prompts, max_new_tokens, temperature, top_p, seed, device)
    try:
        # The list the run saved when it started; a run from an older lite-sft has it decided the same way.
        stop_ids = stop_ids_for(run_dir, tokenizer, model.generation_config)
    except ValueError as err:
        raise ModelError(str(err)) from err
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
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens or 128,
                do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                top_p=top_p if temperature > 0 else None, eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id, use_cache=True,
            )
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers



def _transduce(model, tokenizer, run_dir, sources: list[str], max_new_tokens: int | None, temperature: float,
               top_p: float, seed: int, device) -> list[str]:
    """An encoder-decoder's output for each source, with the generation settings the run saved."""
    from transformers import GenerationConfig

    config = (GenerationConfig.from_pretrained(run_dir) if (Path(run_dir) / GENERATION_CONFIG).is_file()
              else model.generation_config)
    torch.manual_seed(seed)
    answers = []
    for source in sources:
        enc = tokenizer(source, return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(**enc, generation_config=config,
                                 max_new_tokens=max_new_tokens or config.max_new_tokens,
                                 do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                                 top_p=top_p if temperature > 0 else None)
        answers.append(tokenizer.decode(out[0], skip_special_tokens=True).strip())  # the decoder's output only
    return answers
