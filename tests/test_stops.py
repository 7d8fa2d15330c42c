"""One list of stop tokens: decided by lite_sft.stops, saved in generation_config.json, and the same list in
`lite-sft generate`, the demo evaluation, the parity gate and the server."""

import json

import pytest
import torch
from transformers import GenerationConfig

from lite_sft import stops
from lite_sft.stops import read_stop_tokens, save_stop_tokens, stop_ids

EOS, IM_END = 3, 5  # </s> and <|im_end|> of the word-level tokenizer (conftest)

LLAMA3 = ("{% for m in messages %}<|start_header_id|> {{ m['role'] }} <|end_header_id|> {{ m['content'] | trim }}"
          "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|> assistant <|end_header_id|>"
          "{% endif %}")
GEMMA = ("{% for m in messages %}<start_of_turn> {{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
         "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn> model\n{% endif %}")
PHI3 = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
PLAIN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
WORD_AFTER = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} the\n{% endfor %}"
REFUSES = "{{ raise_exception('this template takes a system message first') }}"


def with_template(tokenizer_factory, template, *specials):
    tokenizer = tokenizer_factory(chat_template=template)
    tokenizer.add_special_tokens({"extra_special_tokens": list(specials)}, replace_extra_special_tokens=False)
    return tokenizer


@pytest.mark.parametrize("template, token", [(LLAMA3, "<|eot_id|>"), (GEMMA, "<end_of_turn>"), (PHI3, "<|end|>")])
def test_the_templates_end_of_turn_token_stops_generation(tokenizer_factory, template, token):
    tokenizer = with_template(tokenizer_factory, template, token, "<|start_header_id|>", "<|end_header_id|>",
                              "<start_of_turn>", "<|user|>", "<|assistant|>")
    turn_end = tokenizer.convert_tokens_to_ids(token)
    assert stops.end_of_turn_id(tokenizer) == turn_end
    assert stop_ids(tokenizer) == sorted([EOS, turn_end])


@pytest.mark.parametrize("template", [None, PLAIN, WORD_AFTER, REFUSES])
def test_no_end_of_turn_token_without_a_special_one_in_the_template(tokenizer_factory, template):
    tokenizer = tokenizer_factory(chat_template=template)
    assert stops.end_of_turn_id(tokenizer) is None and stop_ids(tokenizer) == [EOS]


def test_the_list_is_the_union_of_eos_the_generation_config_and_the_end_of_turn(tokenizer):
    assert stop_ids(tokenizer) == [EOS, IM_END]  # EOS </s> differs from the template's <|im_end|>
    assert stop_ids(tokenizer, GenerationConfig(eos_token_id=[EOS, 7])) == [EOS, IM_END, 7]
    assert stop_ids(tokenizer, GenerationConfig(eos_token_id=IM_END)) == [EOS, IM_END]


def test_saved_in_generation_config_json_and_read_back(tokenizer, tmp_path):
    assert read_stop_tokens(tmp_path) is None  # no file: an older run
    assert save_stop_tokens(tmp_path, tokenizer, GenerationConfig(eos_token_id=7, max_new_tokens=9)) == [EOS, IM_END, 7]
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [EOS, IM_END, 7] and saved["max_new_tokens"] == 9
    assert read_stop_tokens(tmp_path) == [EOS, IM_END, 7]
    assert GenerationConfig.from_pretrained(tmp_path).eos_token_id == [EOS, IM_END, 7]

    folder = tmp_path / "merged"  # a model folder: its other fields stay, and it is no longer "from the config"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({"_from_model_config": True, "eos_token_id": 2,
                                                               "pad_token_id": 1}))
    save_stop_tokens(folder, tokenizer)
    assert json.loads((folder / "generation_config.json").read_text()) == {"eos_token_id": [EOS, IM_END],
                                                                           "pad_token_id": 1}
    (folder / "generation_config.json").write_text('{"eos_token_id": "</s>"}')
    with pytest.raises(ValueError, match=r"merged/generation_config.json: eos_token_id '</s>' is not a token id"):
        read_stop_tokens(folder)


class Recorder(torch.nn.Module):
    """Stands in for a model: records the stop ids generate() is given and ends every answer at once."""

    def __init__(self, generation_config):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # callers read the device from here
        self.generation_config = generation_config
        self.eos_token_ids = []

    def generate(self, input_ids, eos_token_id, **kwargs):
        self.eos_token_ids.append(sorted(eos_token_id))
        return torch.cat([input_ids, torch.full((input_ids.shape[0], 1), IM_END)], dim=1)


def test_one_list_in_generate_the_demo_evaluation_the_parity_gate_and_the_server(tokenizer, tmp_path, monkeypatch):
    import lite_sft.generate as generate_cmd
    from lite_sft import tiny
    from lite_sft.config import load_config
    from lite_sft.export.pipeline import run_stop_ids
    from lite_sft.serve.backends.folder import stop_ids as served_stop_ids

    base_config = GenerationConfig(eos_token_id=[EOS, 7])  # a base whose generation config stops at 7 too
    expected = [EOS, IM_END, 7]
    old_run, run = tmp_path / "old-run", tmp_path / "run"
    old_run.mkdir(), run.mkdir()
    save_stop_tokens(run, tokenizer, base_config)  # what the training loop does when a run starts

    model = Recorder(base_config)
    monkeypatch.setattr(generate_cmd, "load_tuned", lambda run_dir: (model, tokenizer, load_config(None, {})))
    generate_cmd.answer(run, ["hello there"])
    generate_cmd.answer(old_run, ["hello there"])  # a run from before the list was saved: decided the same way
    record = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]}
    tiny.generate_answers(model, tokenizer, [record])
    assert model.eos_token_ids == [expected] * 3
    assert run_stop_ids(run, tokenizer, base_config) == run_stop_ids(old_run, tokenizer, base_config) == expected
    assert served_stop_ids(run, tokenizer) == expected

    # The saved list wins over what the function would decide today.
    (run / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, IM_END, 9]}))
    generate_cmd.answer(run, ["hello there"])
    assert model.eos_token_ids[-1] == [EOS, IM_END, 9] == served_stop_ids(run, tokenizer)


def test_a_folder_lite_sft_did_not_write_stops_at_its_config_and_tokenizer_eos(tokenizer, tmp_path):
    from lite_sft.serve.backends.folder import stop_ids as served_stop_ids

    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 8}))
    assert served_stop_ids(tmp_path, tokenizer) == [EOS, 8]


def test_stops_imports_no_training_code():
    import subprocess
    import sys

    probe = "import sys, lite_sft.stops; print(sorted(m for m in sys.modules if m.startswith('lite_sft.')))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['lite_sft.stops']"
