"""Model folders that do not hold what training needs: no tokenizer, or a tokenizer larger than the embedding."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from lite_sft.cli import app
from lite_sft.model import ModelError, load_tokenizer

runner = CliRunner()
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def test_a_folder_without_a_tokenizer_says_what_to_copy(tiny_model_dir, tmp_path):
    bare = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model_dir, bare, ignore=shutil.ignore_patterns(*TOKENIZER_FILES))
    with pytest.raises(ModelError) as err:
        load_tokenizer(str(bare))
    message = str(err.value)
    assert str(bare) in message and "tokenizer" in message and "copy" in message and "\n" not in message


def test_a_tokenizer_larger_than_the_embedding_is_refused_before_training(bpe_tokenizer, tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import TINY_LLAMA

    folder = tmp_path / "small-embedding"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(bpe_tokenizer) - 8, **TINY_LLAMA)).save_pretrained(folder)
    bpe_tokenizer.save_pretrained(folder)
    data = tmp_path / "pc.jsonl"
    data.write_text(json.dumps({"prompt": "hello there", "completion": " how are you"}) + "\n")
    out = tmp_path / "run"
    result = runner.invoke(app, ["tune", "--model", str(folder), "--data", str(data), "--output-dir", str(out),
                                 "--max-steps", "1", "--validation-fraction", "0", "--no-cache"])
    assert result.exit_code == 2, result.output
    error = result.output[result.output.index("error:"):].strip()
    assert str(folder) in error and str(len(bpe_tokenizer)) in error and str(len(bpe_tokenizer) - 8) in error, error
    assert "\n" not in error and not out.exists()
