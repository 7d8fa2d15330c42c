"""Where generation stops: one list of token ids, decided once and written where every reader finds it.

    python -m lite_sft.stops runs/demo        # the stop ids a run (or a model folder) generates up to

A chat model must stop at the end of its turn, and that token is often not the tokenizer's EOS: a base
model's tokenizer ends text with `</s>` or `<|endoftext|>` while its chat template ends each turn with
`<|im_end|>`, `<|eot_id|>` or `<end_of_turn>`, and the generation config may list others. The list is
the union of the three (stop_ids). The training loop writes it into RUN_DIR/generation_config.json when
a run starts and export writes it into merged/ and every ONNX folder (save_stop_tokens), so `lite-sft
generate`, the demo evaluation, the parity gate and the server all stop on the same tokens. A folder
written before the list was saved gets it decided by the same function (stop_ids_for).

It is core and imports nothing of lite-sft's: training, export, the CLI and the server (read_stop_tokens, in
serve/backends/folder.py) all read the list through it.
"""

from __future__ import annotations

import json
from pathlib import Path

# artifacts.GENERATION_CONFIG, spelled out: this module imports nothing of lite-sft's, so any layer may import it.
GENERATION_CONFIG = "generation_config.json"
# An assistant message unlikely to be changed by any template (no leading or trailing space to trim).
PROBE = "lite-sft-stop-probe"


def stop_ids(tokenizer, generation_config=None) -> list[int]:
    """The tokenizer's EOS, the generation config's EOS ids and the chat template's end-of-turn token."""
    configured = getattr(generation_config, "eos_token_id", None)
    ids = [tokenizer.eos_token_id, end_of_turn_id(tokenizer),
           *(configured if isinstance(configured, (list, tuple)) else [configured])]
    return sorted({i for i in ids if isinstance(i, int)})


def end_of_turn_id(tokenizer) -> int | None:
    """The token the chat template writes right after an assistant message, when it is a special token of
    its own (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `<|end|>`); None for plain text or no template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001  (a template may refuse this exchange; jinja raises its own types)
        return None
    if not isinstance(text, str) or PROBE not in text:
        return None
    after = text.rpartition(PROBE)[2]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    if not ids:
        return None
    special = getattr(tokenizer, "added_tokens_decoder", {}).get(ids[0])
    is_special = ids[0] in tokenizer.all_special_ids or bool(getattr(special, "special", False))
    # The whole token must be written by the template, not the first piece of a longer word.
    if is_special and after.startswith(tokenizer.convert_ids_to_tokens(ids[0])):
        return ids[0]
    return None


def read_stop_tokens(folder: str | Path) -> list[int] | None:
    """The `eos_token_id` list in FOLDER/generation_config.json, or None when the file or field is absent."""
    path = Path(folder) / GENERATION_CONFIG
    if not path.is_file():
        return None
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{path} is not a JSON object ({err}); delete it to have the stop tokens decided "
                         "again from the tokenizer") from err
    if eos is None:
        return None
    ids = eos if isinstance(eos, list) else [eos]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{path}: eos_token_id {eos!r} is not a token id or a list of token ids")
    return sorted(set(ids))


def save_stop_tokens(folder: str | Path, tokenizer, generation_config=None) -> list[int]:
    """Decide the stop ids (stop_ids) and write them into FOLDER/generation_config.json; returns the list."""
    ids = stop_ids(tokenizer, generation_config)
    write_stop_tokens(folder, ids, generation_config)
    return ids


def write_stop_tokens(folder: str | Path, ids: list[int], generation_config=None) -> None:
    """Set `eos_token_id` in FOLDER/generation_config.json to `ids`, keeping the file's other fields (a new
    file starts from `generation_config`)."""
    path = Path(folder) / GENERATION_CONFIG
    if path.is_file():
        config = json.loads(path.read_text())
    elif generation_config is not None and hasattr(generation_config, "to_diff_dict"):
        config = generation_config.to_diff_dict()
    else:
        config = {}
    config["eos_token_id"] = sorted(set(ids))
    # Marked as made from config.json, transformers' generate() may rebuild it from there and lose the list.
    config.pop("_from_model_config", None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def stop_ids_for(folder: str | Path, tokenizer, generation_config=None) -> list[int]:
    """The list saved in FOLDER, or, for a folder written before it was saved, the one stop_ids decides."""
    saved = read_stop_tokens(folder)
    return saved if saved is not None else stop_ids(tokenizer, generation_config)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(prog="python -m lite_sft.stops", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a run directory or a model folder (with its tokenizer)")
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    ids = stop_ids_for(args.folder, tokenizer)
    print(", ".join(f"{i} {tokenizer.convert_ids_to_tokens(i)!r}" for i in ids))


if __name__ == "__main__":
    main()
