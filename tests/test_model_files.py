"""Model folders that do not hold what training needs: no tokenizer, or a tokenizer larger than the embedding."""

from __future__ import annotations

import shutil

import pytest

from lite_sft.model import ModelError, load_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def test_a_folder_without_a_tokenizer_says_what_to_copy(tiny_model_dir, tmp_path):
    bare = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model_dir, bare, ignore=shutil.ignore_patterns(*TOKENIZER_FILES))
    with pytest.raises(ModelError) as err:
        load_tokenizer(str(bare))
    message = str(err.value)
    assert str(bare) in message and "tokenizer" in message and "copy" in message and "\n" not in message
