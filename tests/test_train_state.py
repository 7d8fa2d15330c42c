"""What a run keeps: the best adapter across a resume, the config it started with, the rows of tokens it
added, and the held-out split it was validated on."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lite_sft import checkpoint
from lite_sft.config import load_config
from lite_sft.train import tune

from test_train import losses, make_cfg


def _adapter(run):
    return load_file(str(run / "adapter_model.safetensors"))


def test_early_stopping_after_resume_keeps_the_best_adapter(tiny_model_dir, chat_jsonl, tmp_path, monkeypatch):
    """The best adapter was only held in memory: a resumed run that then stopped early kept its last
    weights while saying it kept the best."""
    import lite_sft.train as train

    scores = {1: 1.0, 2: 0.5, 3: 0.9, 4: 0.95, 5: 0.97, 6: 0.99}  # validation loss by step: best at 2
    calls = []
    states = {}

    def fake_evaluate(run):
        calls.append(len(calls) + 1)
        return {"val_loss": scores[calls[-1]]}

    def on_step(step, record, model):
        states[step] = checkpoint.trainable_state(model)
        if step == 3 and not interrupted:
            interrupted.append(step)
            raise KeyboardInterrupt

    interrupted = []
    monkeypatch.setattr(train, "evaluate", fake_evaluate)
    run = tmp_path / "run"
    overrides = {"train.max_steps": 6, "train.eval_every": 1, "train.save_every": 1,
                 "train.early_stopping_patience": 2, "train.keep_last": 1}
    with pytest.raises(KeyboardInterrupt):
        tune(make_cfg(tiny_model_dir, chat_jsonl, run, **overrides), on_step=on_step)
    assert json.loads((run / "best" / "best.json").read_text())["step"] == 2
    summary = tune(make_cfg(tiny_model_dir, chat_jsonl, run, **overrides), resume=True, on_step=on_step)

    assert summary["stopped_early"] and summary["steps"] == 4
    assert summary["best_step"] == 2 and summary["adapter_step"] == 2
    saved = _adapter(run)
    name = next(n for n in states[2] if "lora_B" in n)
    assert torch.equal(saved[name.replace(".default", "")], states[2][name])
    assert not torch.equal(states[4][name], states[2][name])  # the last weights differ: the best was kept


def test_a_best_adapter_saved_after_the_resumed_checkpoint_is_not_kept(tiny_model_dir, chat_jsonl, tmp_path, monkeypatch):
    """A best from steps the resumed run replays belongs to the interrupted run; the resumed run re-earns it."""
    import lite_sft.train as train

    run = tmp_path / "run"
    overrides = {"train.max_steps": 4, "train.eval_every": 2, "train.save_every": 2, "train.early_stopping_patience": 5}
    tune(make_cfg(tiny_model_dir, chat_jsonl, run, **overrides))
    assert json.loads((run / "best" / "best.json").read_text())["step"] == 4
    (run / "checkpoints" / "step-0000004").rename(run / "checkpoints" / "gone")  # as if cut before step 4 saved
    monkeypatch.setattr(train, "evaluate", lambda run: {"val_loss": 10.0})  # no better validation after step 2 now
    tune(make_cfg(tiny_model_dir, chat_jsonl, run, **{**overrides, "train.max_steps": 3}), resume=True)
    assert json.loads((run / "best" / "best.json").read_text())["step"] == 2


def test_resume_accepts_the_command_that_started_the_run(tiny_model_dir, chat_jsonl, tmp_path):
    """format: auto is saved as the detected format and --auto-batch as the batch it chose; resuming with
    the same command must not be refused as a changed config."""
    from lite_sft import plan

    run = tmp_path / "run"
    asked = {"data.format": "auto", "train.auto_batch": True, "train.micro_batch_size": 4, "train.grad_accum": 1,
             "train.max_steps": 2, "data.packing": False}
    cfg = make_cfg(tiny_model_dir, chat_jsonl, run, **asked)
    two = plan.estimate(cfg, micro_batch_size=2, device="cpu").total_bytes
    four = plan.estimate(cfg, micro_batch_size=4, device="cpu").total_bytes
    asked["train.memory_budget"] = str((two + four) // 2)
    tune(make_cfg(tiny_model_dir, chat_jsonl, run, **asked))
    saved = load_config(run / "config.yaml")
    assert saved.data.format == "messages" and (saved.train.micro_batch_size, saved.train.grad_accum) == (2, 2)

    tune(make_cfg(tiny_model_dir, chat_jsonl, run, **{**asked, "train.max_steps": 3}), resume=True)
    assert len(losses(run)) == 3


def _untemplated_model(tmp_path, tokenizer, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / f"model-{'tied' if tied else 'untied'}"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied,
                                 pad_token_id=tokenizer.pad_token_id)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def _cfg(model_dir, data, out, **overrides):
    return load_config(None, {"model.name_or_path": str(model_dir), "data.path": str(data), "data.max_seq_len": 64,
                              "data.validation_fraction": 0.0, "train.max_steps": 3, "lora.r": 2, "train.lr": 5e-2,
                              "train.save_every": 0, "output_dir": str(out), **overrides})


def test_template_tokens_of_an_untied_output_layer_are_saved_and_restored(tmp_path, tokenizer_factory, chat_jsonl):
    """ChatML rows added to an untied output layer were neither trained nor saved: every load resized them
    afresh at random, so the tuned model's prediction of <|im_end|> changed from one load to the next."""
    from lite_sft.tasks.causal_lm.masking import ensure_chat_template
    from lite_sft.model import load_tuned

    tokenizer = tokenizer_factory(chat_template=None, chatml=False)
    model_dir = _untemplated_model(tmp_path, tokenizer, tied=False)
    templated = tokenizer_factory(chat_template=None, chatml=False)
    assert ensure_chat_template(templated)  # the tokens tuning adds, at the same ids
    ids = torch.tensor([templated.apply_chat_template(
        [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "fine thanks"}], return_dict=False)])
    trained = {}

    def on_step(step, record, model):
        if step == 3:
            model.eval()
            with torch.no_grad():
                trained["logits"] = model(input_ids=ids).logits
            model.train()

    run = tmp_path / "run"
    # fp32 pinned: the logits compared at 1e-5 are training's (under autocast if it ran in bf16) and a plain load's
    tune(_cfg(model_dir, chat_jsonl, run, **{"model.cpu_bf16": "off"}), on_step=on_step)

    saved = _adapter(run)
    assert any("lm_head" in name and "trainable_tokens" in name for name in saved), sorted(saved)
    assert not [name for name in saved if name.endswith(("embed_tokens.weight", "lm_head.weight"))]  # rows, not tables
    for _ in range(2):  # two loads agree with the trained model, so neither re-randomised the rows
        model, _, _ = load_tuned(run, torch.device("cpu"))
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        torch.testing.assert_close(logits, trained["logits"], rtol=1e-5, atol=1e-5)


def test_data_that_needs_no_template_adds_no_tokens(tmp_path, tokenizer_factory):
    """prompt_completion and text need no chat template: a tokenizer without one keeps its vocabulary, so
    the adapter holds LoRA weights only (no resized embedding or output layer)."""
    from transformers import AutoTokenizer

    tokenizer = tokenizer_factory(chat_template=None, chatml=False)
    model_dir = _untemplated_model(tmp_path, tokenizer, tied=False)
    for fmt, record in (("prompt_completion", {"prompt": "what is two plus four", "completion": " the answer"}),
                        ("text", {"text": "hello there how are you"})):
        data = tmp_path / f"{fmt}.jsonl"
        data.write_text(json.dumps(record) + "\n")
        run = tmp_path / fmt
        tune(_cfg(model_dir, data, run, **{"train.max_steps": 1}))
        assert len(AutoTokenizer.from_pretrained(run)) == len(tokenizer), fmt
        assert all("lora_" in name for name in _adapter(run)), fmt
        assert load_config(run / "config.yaml").data.format == fmt


def test_the_held_out_split_is_recorded_in_the_run_directory(tiny_model_dir, chat_jsonl, tmp_path):
    import hashlib

    from lite_sft.tasks.causal_lm.data import load_samples
    from lite_sft.tasks.split import split_validation

    run = tmp_path / "run"
    tune(make_cfg(tiny_model_dir, chat_jsonl, run, **{"train.max_steps": 1, "data.validation_fraction": 0.25}))
    split = json.loads((run / "validation_split.json").read_text())
    held = split_validation(load_samples(str(chat_jsonl))[1], 0.25, seed=7)[1]
    assert split["sources"] == [s.source for s in held] and split["count"] == len(held) == 12
    assert split["data_sha256"] == hashlib.sha256(chat_jsonl.read_bytes()).hexdigest()
    assert split["source"] == f"held-out fraction 0.25 of {chat_jsonl}, seed 7"
    first = split["examples"][0]
    trained = [i for i, label in enumerate(first["labels"]) if label != -100]
    assert trained and all(first["labels"][i] == first["input_ids"][i] for i in trained)
