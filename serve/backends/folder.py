"""What a model folder tells every backend beside its weights: the tokenizer, the context and the stop ids.

    tokenizer = load_tokenizer(Path("exports/demo/onnx"))
    stop_ids(Path("exports/demo/onnx"), tokenizer)     # [2, 151645]: what generation stops at
    max_context(Path("exports/demo/onnx"))             # 2048: tokens the model reads at most

The file names are lite_sft.artifacts'; the stop ids are the list lite_sft.stops wrote, read by its reader.
"""

from __future__ import annotations

import json
from pathlib import Path

from lite_sft.artifacts import GENERATION_CONFIG, MODEL_CONFIG, TOKENIZER_FILES, read_json_object
from lite_sft.errors import ServeError
from lite_sft.stops import read_stop_tokens


def check_tokenizer(folder: Path) -> None:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ServeError(f"{folder} has no tokenizer ({' or '.join(TOKENIZER_FILES[:2])}): the tokenizer is saved "
                         "beside the model by `lite-sft export`; copy it from the run directory")


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    check_tokenizer(folder)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ServeError(f"could not load the tokenizer in {folder}: {err}") from err


def stop_ids(folder: Path, tokenizer) -> list[int]:
    """The ids generation stops at: `eos_token_id` of generation_config.json, where `lite-sft export` writes
    the run's one list (EOS, the generation config's and the chat template's end of turn: lite_sft/stops.py,
    whose reader this is), and the tokenizer's EOS, already in that list. A folder lite-sft did not write may
    have no such field: then config.json's EOS."""
    folder = Path(folder)
    try:
        saved = read_stop_tokens(folder)
    except ValueError as err:  # the words serving has always said: the export is what to redo
        if err.__cause__ is None:  # a field that is not token ids
            raise ServeError(f"{err}: re-export the model") from err
        raise ServeError(f"{folder / GENERATION_CONFIG} is not a JSON object ({err.__cause__}): re-export the model") \
            from err
    if saved is None and (folder / MODEL_CONFIG).is_file():
        eos = read_json_object(folder / MODEL_CONFIG).get("eos_token_id")
        saved = [] if eos is None else eos if isinstance(eos, list) else [eos]
    ids = (saved or []) + [tokenizer.eos_token_id]
    return sorted({i for i in ids if isinstance(i, int)})


def max_context(folder: Path, tokenizer=None) -> int:
    """Tokens the model reads at most: its position table's size, or (given) the tokenizer's limit if lower.
    Encoders and seq2seq models pass their tokenizer: RoBERTa's table has 514 rows for 512 tokens, and T5 has
    no table at all (relative positions) but was trained up to the tokenizer's 512."""
    config = json.loads((folder / MODEL_CONFIG).read_text())
    limit = next((config[key] for key in ("max_position_embeddings", "n_positions", "max_sequence_length",
                                          "seq_length") if isinstance(config.get(key), int)), None)
    said = getattr(tokenizer, "model_max_length", None)
    if isinstance(said, int) and said < 10**6:  # transformers stores "no limit" as a huge int
        limit = min(limit or said, said)
    return limit or 2048
