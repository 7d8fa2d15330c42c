"""The embedded default: bundled skill data, the locally trained tokenizer, the seeded tiny Llama,
and the exact-match score the demo reports."""

from __future__ import annotations

import re

import pytest
import torch

from lite_sft import tiny
from lite_sft.config import BUILTIN_DEFAULTS
from lite_sft.tasks.causal_lm.masking import DEFAULT_CHAT_TEMPLATE


@pytest.fixture(scope="module")
def builtin_dir(tmp_path_factory):
    return tiny.materialize_builtin_model(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def builtin_tokenizer(builtin_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_dir)


def _prompt_digits(record: dict) -> str:
    return re.search(r"\d+", record["messages"][0]["content"]).group()


def test_materialize_is_deterministic_and_reused(builtin_dir, tmp_path, monkeypatch):
    again = tiny.materialize_builtin_model(tmp_path)
    assert again.name == builtin_dir.name and again.name.startswith("tiny-llama-")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (builtin_dir / name).read_bytes(), name
    assert [p.name for p in tmp_path.iterdir()] == [again.name]  # no temporary folder left behind

    # A complete folder is reused, not rebuilt.
    monkeypatch.setattr(tiny, "build_tokenizer", lambda *a, **k: pytest.fail("rebuilt a complete folder"))
    assert tiny.materialize_builtin_model(tmp_path) == again


def test_materialize_defaults_to_lite_sft_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LITE_SFT_HOME", str(tmp_path))
    assert tiny.builtin_home() == tmp_path / "builtin"


def test_builtin_folder_loads_as_a_standard_hf_model(builtin_dir, builtin_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(builtin_dir)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(builtin_tokenizer)
    assert model.config.eos_token_id == builtin_tokenizer.convert_tokens_to_ids(tiny.IM_END)
    assert model.generation_config.eos_token_id == model.config.eos_token_id


def test_assets_are_what_the_generator_writes(tmp_path):
    train, held_out = tiny.generate_skill_data()
    assert tiny.load_skill_train() == train and tiny.load_skill_eval() == held_out
    written = tiny.write_assets(tmp_path)
    for path in written:
        assert path.read_bytes() == (tiny._assets() / path.name).read_bytes(), path.name
    assert len(train) == tiny.N_TRAIN and len(held_out) == tiny.N_EVAL


def test_held_out_inputs_are_new():
    train, held_out = tiny.generate_skill_data()
    train_digits = {_prompt_digits(r) for r in train}
    for record in held_out:
        digits = _prompt_digits(record)
        assert digits not in train_digits and digits[::-1] not in train_digits
        assert record["messages"][-1]["content"] == digits[::-1]
    assert not {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"] for r in held_out}


def test_tokenizer_is_fast_and_round_trips_the_data(builtin_tokenizer):
    tok = builtin_tokenizer
    assert tok.is_fast and tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert tok.eos_token == tiny.IM_END and tok.pad_token == tiny.PAD and tok.pad_token_id != tok.eos_token_id
    for record in tiny.load_skill_train()[:200] + tiny.load_skill_eval():
        text = tok.apply_chat_template(record["messages"], tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        prompt = tok.apply_chat_template(record["messages"][:1], add_generation_prompt=True, return_dict=False)
        assert ids[:len(prompt)] == prompt  # the answer's tokens start where the prompt's end
        answer = record["messages"][-1]["content"]
        assert tok.tokenize(answer) == list(answer)  # one token per digit


class _Reverser(torch.nn.Module):
    """Stands in for a tuned model: 'generates' each prompt's digits reversed (or not, if wrong)."""

    def __init__(self, tokenizer, right: bool):
        super().__init__()
        self.tokenizer, self.right = tokenizer, right
        self.weight = torch.nn.Parameter(torch.zeros(1))  # exact_match reads the device from here

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **kwargs):
        tok = self.tokenizer
        assert (attention_mask[:, -1] == 1).all(), "prompts must be left-padded"
        rows = []
        for ids in input_ids.tolist():
            digits = re.search(r"user\n\D*(\d+)", tok.decode(ids)).group(1)
            answer = digits[::-1] if self.right else digits + "0"
            # Tokens after the stop token must be ignored.
            rows.append(tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] + tok("99")["input_ids"])
        width = max(map(len, rows))
        new = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def test_exact_match_scores_right_and_wrong_answers(builtin_tokenizer):
    records = tiny.load_skill_eval()[:50]
    right = _Reverser(builtin_tokenizer, right=True)
    assert tiny.exact_match(right, builtin_tokenizer, records, batch_size=16) == 1.0
    assert right.training and builtin_tokenizer.padding_side == "right"  # both put back
    assert tiny.exact_match(_Reverser(builtin_tokenizer, right=False), builtin_tokenizer, records) == 0.0
    assert tiny.exact_match(right, builtin_tokenizer, []) == 0.0


def test_random_base_model_scores_zero(builtin_dir, builtin_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(builtin_dir)
    records = tiny.load_skill_eval()[:32]
    answers = tiny.generate_answers(model, builtin_tokenizer, records, max_new_tokens=8)
    assert len(answers) == len(records)
    assert tiny.exact_match(model, builtin_tokenizer, records, max_new_tokens=8) == 0.0


def test_demo_defaults_are_a_valid_config():
    from lite_sft.config import load_config

    cfg = load_config(None, {f"{section}.{key}": value for section, values in BUILTIN_DEFAULTS.items()
                             for key, value in values.items()})
    cfg.validate()
    assert cfg.train.max_steps == BUILTIN_DEFAULTS["train"]["max_steps"]
