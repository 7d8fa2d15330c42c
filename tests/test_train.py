"""The training loop: what trains, what does not, accumulation, resume, divergence, QLoRA, outputs."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lite_sft import checkpoint
from lite_sft.config import load_config
from lite_sft.train import RunDirError, TrainingDiverged, tune


def make_cfg(model_dir, data_file, out, **overrides):
    values = {
        "model.name_or_path": str(model_dir), "data.path": str(data_file), "data.max_seq_len": 64,
        "data.validation_fraction": 0.1, "lora.r": 4, "lora.alpha": 8, "lora.dropout": 0.0,
        "train.max_steps": 4, "train.micro_batch_size": 2, "train.lr": 5e-3, "train.warmup_ratio": 0.0,
        "train.eval_every": 2, "train.save_every": 2, "train.seed": 7, "output_dir": str(out),
    }
    values.update(overrides)
    return load_config(None, values)


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_trainable_params_change_and_frozen_ones_do_not(tiny_model_dir, chat_jsonl, tmp_path):
    snapshots = {}

    def on_step(step, record, model):
        snapshots[step] = {n: p.detach().clone() for n, p in model.named_parameters()}

    cfg = make_cfg(tiny_model_dir, chat_jsonl, tmp_path / "run", **{"train.max_steps": 3})
    tune(cfg, on_step=on_step)
    model = snapshots[3]
    trainable = [n for n in model if "lora_" in n]
    assert trainable, "no LoRA parameters found"
    for name in trainable:
        assert not torch.equal(snapshots[1][name], model[name]), f"{name} did not train"
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    frozen = [n for n in model if "lora_" not in n]
    for name in frozen:
        assert torch.equal(snapshots[1][name], model[name]), f"frozen {name} changed"
    checked = 0
    for name, tensor in base.items():  # frozen weights still equal the base checkpoint on disk
        peft_name = "base_model.model." + name.replace(".weight", ".base_layer.weight")
        key = peft_name if peft_name in model else "base_model.model." + name
        if key in model:
            assert torch.equal(model[key], tensor), key
            checked += 1
    assert checked == len(base) or checked > 5


def test_seeded_loss_regression(tiny_model_dir, chat_jsonl, tmp_path):
    tune(make_cfg(tiny_model_dir, chat_jsonl, tmp_path / "a"))
    tune(make_cfg(tiny_model_dir, chat_jsonl, tmp_path / "b"))
    first, second = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert first == pytest.approx(second, rel=1e-6)
    assert len(first) == 4 and first[-1] < first[0]  # it learns something in four steps


def grad_norms(run_dir):
    return [json.loads(line)["grad_norm"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "grad_norm" in json.loads(line)]


# fp32 sums the same products in another order: 1e-4. bf16 autocast rounds each matmul's inputs to 8 bits of
# mantissa (2^-8 = 0.4%), differently for rows batched differently; a wrong scale across accumulation steps
# would still be off by a factor of 2 or 4.
PRECISION_TOLERANCE = {"off": 1e-4, "on": 2e-2}


@pytest.mark.parametrize("cpu_bf16", ["off", "on"])
def test_gradient_accumulation_matches_one_big_batch(tiny_model_dir, chat_jsonl, tmp_path, cpu_bf16):
    """Loss is averaged per trained token across the whole optimiser step (transformers #34191). The
    gradient norms are compared too: AdamW's update hardly moves when every gradient is scaled by the same
    factor, and clipping hides it altogether, so equal losses alone would not catch a wrong scale."""
    runs = {}
    for micro, accum in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"m{micro}a{accum}"
        tune(make_cfg(tiny_model_dir, chat_jsonl, out, **{"train.micro_batch_size": micro, "train.grad_accum": accum,
                                                          "data.packing": False, "model.cpu_bf16": cpu_bf16}))
        runs[(micro, accum)] = losses(out), grad_norms(out)
    reference, reference_norms = runs[(4, 1)]
    assert len(reference_norms) == 4 and all(n > 0 for n in reference_norms)
    rel = PRECISION_TOLERANCE[cpu_bf16]
    for key, (values, norms) in runs.items():
        assert values == pytest.approx(reference, rel=rel, abs=1e-5), key
        assert norms == pytest.approx(reference_norms, rel=rel), key


def test_logged_gradient_norm_is_the_norm_of_the_mean_token_loss_gradient(tiny_model_dir, chat_jsonl, tmp_path, monkeypatch):
    """The gradient a step applies is d(mean cross-entropy over the step's trained tokens): checked against
    a plain full-logits loss on the same rows, so a constant factor anywhere in the loop would show."""
    import torch.nn.functional as F

    import lite_sft.tasks.causal_lm.data
    import lite_sft.train as train
    from lite_sft.tasks.causal_lm.masking import IGNORE_INDEX
    from lite_sft.tasks.causal_lm.packing import collate

    seen = {}
    prepare, add_lora, step = lite_sft.tasks.causal_lm.data.prepare_data, train.add_lora, torch.optim.AdamW.step
    monkeypatch.setattr(lite_sft.tasks.causal_lm.data, "prepare_data", lambda *a, **k: seen.setdefault("data", prepare(*a, **k)))
    monkeypatch.setattr(train, "add_lora", lambda *a, **k: seen.setdefault("model", add_lora(*a, **k)))

    def checked_step(self, *args, **kwargs):
        if "reference" not in seen:
            model, data = seen["model"], seen["data"]
            params = [p for p in model.parameters() if p.requires_grad]
            applied = [p.grad.clone() for p in params]
            batch = collate([data.train[i] for i in train._rows_for_step(0, len(data.train), 4, 7)], pad_id=0)
            targets = batch.pop("labels")[:, 1:]
            logits = model(**batch, use_cache=False).logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                                   reduction="sum") / (targets != IGNORE_INDEX).sum()
            grads = torch.autograd.grad(loss, params)
            seen["reference"] = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
            for p, g in zip(params, applied):
                p.grad = g
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", checked_step)
    out = tmp_path / "run"
    tune(make_cfg(tiny_model_dir, chat_jsonl, out, **{"train.micro_batch_size": 2, "train.grad_accum": 2,
                                                      "train.max_steps": 1, "model.dtype": "float32"}))
    assert grad_norms(out)[0] == pytest.approx(seen["reference"], rel=1e-4)


def test_resume_after_interruption_reproduces_the_uninterrupted_run(tiny_model_dir, chat_jsonl, tmp_path):
    overrides = {"train.max_steps": 6, "train.save_every": 2, "lora.dropout": 0.1}
    tune(make_cfg(tiny_model_dir, chat_jsonl, tmp_path / "whole", **overrides))

    def interrupt(step, record, model):
        if step == 5:
            raise KeyboardInterrupt

    cfg = make_cfg(tiny_model_dir, chat_jsonl, tmp_path / "cut", **overrides)
    with pytest.raises(KeyboardInterrupt):
        tune(cfg, on_step=interrupt)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path / "cut")] == [2, 4]
    assert not (tmp_path / "cut" / "adapter_model.safetensors").exists()
    tune(load_config(tmp_path / "cut" / "config.yaml"), resume=True)
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "whole"), rel=1e-6)
    whole = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    cut = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    for name in whole:
        torch.testing.assert_close(cut[name], whole[name])


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, chat_jsonl, tmp_path):
    def poison(step, record, model):
        if step == 2:
            name, param = next((n, p) for n, p in model.named_parameters() if "lora_B" in n)
            with torch.no_grad():
                param.fill_(float("nan"))

    cfg = make_cfg(tiny_model_dir, chat_jsonl, tmp_path / "run", **{"train.save_every": 1})
    with pytest.raises(TrainingDiverged, match=r"step 3.*step-0000002"):
        tune(cfg, on_step=poison)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path / "run")] == [1, 2]
    good = load_file(str(tmp_path / "run" / "checkpoints" / "step-0000002" / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in good.values())
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_keep_last_rotates_checkpoints(tiny_model_dir, chat_jsonl, tmp_path):
    cfg = make_cfg(tiny_model_dir, chat_jsonl, tmp_path / "run",
                   **{"train.max_steps": 5, "train.save_every": 1, "train.keep_last": 2})
    tune(cfg)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path / "run")] == [4, 5]
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_run_directory_outputs_load_with_peft(tiny_model_dir, chat_jsonl, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    summary = tune(make_cfg(tiny_model_dir, chat_jsonl, run))
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "metrics.jsonl",
                 "summary.json", "loss_curve.png", "tokenizer.json"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").iterdir())
    tokenizer = AutoTokenizer.from_pretrained(run)
    assert tokenizer.chat_template
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run)
    assert any(torch.count_nonzero(p) for n, p in model.named_parameters() if "lora_B" in n)
    for key in ("tokens_per_s", "trained_tokens", "final_train_loss", "final_val_loss", "peak_rss_bytes"):
        assert summary[key] is not None, key
    assert summary["trained_tokens"] > 0 and math.isfinite(summary["final_val_loss"])
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert [e["step"] for e in evals] == [2, 4]
    assert evals[-1]["val_perplexity"] == pytest.approx(math.exp(evals[-1]["val_loss"]))


def test_qlora_4bit_runs_on_cpu(tiny_model_dir, chat_jsonl, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    seen = {}

    def on_step(step, record, model):
        seen["4bit"] = any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        seen["loss"] = record["loss"]
        # Every adapter learns, down to the first layer: gradients flow through the 4-bit matmuls
        # (bitsandbytes' CPU inference kernel has no backward; it must not be used while training).
        seen["untrained"] = [n for n, p in model.named_parameters() if "lora_B" in n and not p.abs().sum()]

    tune(make_cfg(tiny_model_dir, chat_jsonl, tmp_path / "run", **{"model.quant": "4bit", "train.max_steps": 3, "train.eval_every": 1}),
         on_step=on_step)
    assert seen["4bit"] and math.isfinite(seen["loss"])
    assert seen["untrained"] == []
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_existing_run_dir_is_refused_and_untouched_by_a_failed_overwrite(tiny_model_dir, chat_jsonl, tmp_path):
    run = tmp_path / "run"
    tune(make_cfg(tiny_model_dir, chat_jsonl, run, **{"train.max_steps": 1}))
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    with pytest.raises(RunDirError, match="--overwrite"):
        tune(make_cfg(tiny_model_dir, chat_jsonl, run))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl"):
        tune(make_cfg(tiny_model_dir, bad, run), overwrite=True)
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before


def test_resume_refuses_a_changed_config_or_a_run_without_checkpoints(tiny_model_dir, chat_jsonl, tmp_path):
    from lite_sft.config import ConfigError

    with pytest.raises(RunDirError, match="no checkpoint"):
        tune(make_cfg(tiny_model_dir, chat_jsonl, tmp_path / "none"), resume=True)
    run = tmp_path / "run"
    tune(make_cfg(tiny_model_dir, chat_jsonl, run, **{"train.max_steps": 2}))
    with pytest.raises(ConfigError, match="train.lr"):
        tune(make_cfg(tiny_model_dir, chat_jsonl, run, **{"train.lr": 1.0, "data.format": "messages"}), resume=True)
    # Lengthening the run is allowed, and continues from step 2.
    tune(make_cfg(tiny_model_dir, chat_jsonl, run, **{"train.max_steps": 3, "data.format": "messages"}), resume=True)
    assert len(losses(run)) == 3


def test_early_stopping_keeps_the_best_adapter(tiny_model_dir, chat_jsonl, tmp_path, monkeypatch):
    import lite_sft.train as train

    scores = iter([1.0, 0.5, 0.9, 0.95, 0.97, 0.99])
    kept = {}

    def fake_evaluate(run):
        kept[len(kept)] = checkpoint.trainable_state(run.accelerator.unwrap_model(run.model))
        return {"val_loss": next(scores)}

    monkeypatch.setattr(train, "evaluate", fake_evaluate)
    run = tmp_path / "run"
    summary = tune(make_cfg(tiny_model_dir, chat_jsonl, run, **{
        "train.max_steps": 6, "train.eval_every": 1, "train.early_stopping_patience": 2}))
    assert summary["stopped_early"] and summary["steps"] == 4
    saved = load_file(str(run / "adapter_model.safetensors"))
    best = kept[1]  # the state evaluated at step 2, the lowest loss
    lora_b = next(n for n in best if "lora_B" in n)
    short = lora_b.replace(".default", "")
    assert torch.equal(saved[short], best[lora_b])


def test_length_grouped_steps_cover_each_row_once_per_epoch_and_pad_little():
    from lite_sft.train import _rows_for_step

    rng = __import__("random").Random(0)
    lengths = tuple(rng.randint(10, 1000) for _ in range(800))
    rows_per_step = 8
    steps = len(lengths) // rows_per_step

    def padding(grouped: bool) -> float:
        padded = 0
        for step in range(steps):
            rows = _rows_for_step(step, len(lengths), rows_per_step, seed=3, lengths=lengths if grouped else None)
            padded += sum(max(lengths[r] for r in rows) - lengths[r] for r in rows)
        return padded / sum(lengths)

    epoch = [r for s in range(steps) for r in _rows_for_step(s, len(lengths), rows_per_step, 3, lengths)]
    assert sorted(epoch) == list(range(len(lengths)))
    assert epoch != sorted(epoch, key=lambda r: -lengths[r])  # steps are shuffled, not longest first
    assert padding(grouped=True) < 0.1 * padding(grouped=False)
    assert _rows_for_step(5, len(lengths), rows_per_step, 3, lengths) == _rows_for_step(5, len(lengths), rows_per_step, 3, lengths)


def test_offloading_activations_on_cpu_is_refused_before_the_run_directory_is_touched(tiny_model_dir, chat_jsonl, tmp_path):
    from lite_sft.config import ConfigError

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="offload_activations"):
        tune(make_cfg(tiny_model_dir, chat_jsonl, out, **{"model.offload_activations": True}))
    assert not out.exists()


def test_auto_batch_picks_the_micro_batch_the_plan_fits_and_keeps_rows_per_step(tiny_model_dir, chat_jsonl, tmp_path):
    from lite_sft import plan

    overrides = {"train.micro_batch_size": 4, "train.grad_accum": 1, "train.max_steps": 1, "train.auto_batch": True}
    cfg = make_cfg(tiny_model_dir, chat_jsonl, tmp_path / "run", **overrides)
    fits_two = plan.estimate(cfg, micro_batch_size=2, device="cpu").total_bytes
    fits_four = plan.estimate(cfg, micro_batch_size=4, device="cpu").total_bytes
    assert fits_two < fits_four
    cfg.train.memory_budget = str((fits_two + fits_four) // 2)

    tune(cfg)

    saved = load_config(tmp_path / "run" / "config.yaml").train
    assert (saved.micro_batch_size, saved.grad_accum) == (2, 2)


def test_bf16_autocast_trains_on_any_cpu_and_the_run_records_it(tiny_model_dir, chat_jsonl, tmp_path, monkeypatch):
    """`--cpu-bf16 on` computes in bf16 whatever the CPU (emulated where it has no native bf16): the losses
    follow fp32's within bf16's rounding without equalling them. `auto` records what it chose."""
    from lite_sft import model as model_module

    seen = set()
    linear_forward = torch.nn.Linear.forward

    def recording_forward(self, x):
        out = linear_forward(self, x)
        seen.add(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Linear, "forward", recording_forward)
    runs = {}
    for setting in ("off", "on"):
        seen.clear()
        tune(make_cfg(tiny_model_dir, chat_jsonl, tmp_path / setting, **{"model.cpu_bf16": setting}))
        runs[setting] = losses(tmp_path / setting)
        assert load_config(tmp_path / setting / "config.yaml").model.cpu_bf16 == setting
        assert (torch.bfloat16 in seen) == (setting == "on"), (setting, seen)
    assert runs["on"] != runs["off"]
    assert runs["on"] == pytest.approx(runs["off"], rel=PRECISION_TOLERANCE["on"])
    for detected in (True, False):  # auto takes the CPU's answer, and config.yaml keeps it for eval and resume
        monkeypatch.setattr(model_module, "cpu_has_fast_bf16", lambda: detected)
        out = tmp_path / f"auto-{detected}"
        tune(make_cfg(tiny_model_dir, chat_jsonl, out, **{"train.max_steps": 1}))
        assert load_config(out / "config.yaml").model.cpu_bf16 == ("on" if detected else "off")
