"""The serving runtime: ONNX Runtime and PyTorch backends under one generation loop, the benchmark, and the
errors a user sees. A tiny tuned run is exported once (merged/, onnx/, onnx-int8/) for the whole module."""

import json

import pytest
import torch
from typer.testing import CliRunner

from lite_sft.cli import app
from lite_sft.serve import ServeError
from lite_sft.serve.generate import SamplingParams, TextStream, generate, generate_ids, pad_left
from lite_sft.serve.backends.factory import load_backend, resolve_model
from lite_sft.serve.backends.folder import stop_ids
from lite_sft.serve.backends.ort import OrtBackend
from lite_sft.serve.backends.pytorch import TorchBackend

runner = CliRunner()
PROMPTS = [[40, 41, 42, 43, 44, 45, 46], [50, 51, 52], [60]]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_model_dir, chat_jsonl):
    from lite_sft.config import load_config
    from lite_sft.export.pipeline import export_run
    from lite_sft.options import ExportOptions
    from lite_sft.train import tune

    root = tmp_path_factory.mktemp("serve-export")
    tune(load_config(None, {"model.name_or_path": str(tiny_model_dir), "data.path": str(chat_jsonl),
                            "data.max_seq_len": 64, "lora.r": 4, "lora.alpha": 8, "lora.dropout": 0.0,
                            "train.max_steps": 2, "train.micro_batch_size": 2, "train.lr": 5e-2,
                            "train.eval_every": 0, "train.save_every": 0, "output_dir": str(root / "run")}))
    export_run(root / "run", root / "export", ExportOptions(quantize="int8", parity_prompts=2, parity_tokens=4),
               say=lambda _: None)
    return root / "export"


@pytest.fixture(scope="module")
def ort(export_dir):
    return OrtBackend(export_dir / "onnx", "cpu", threads=1)


@pytest.fixture(scope="module")
def merged(export_dir):
    return TorchBackend.from_folder(export_dir / "merged", "cpu")


@pytest.fixture(scope="module")
def tokenizer(export_dir):
    return load_backend(export_dir, "cpu", threads=1)[1]


def greedy(n=12):
    return SamplingParams(max_new_tokens=n)


def test_onnx_and_pytorch_greedy_agree_token_for_token_batched_and_alone(ort, merged, export_dir):
    from transformers import AutoModelForCausalLM

    batched = generate_ids(ort, PROMPTS, greedy())
    assert batched == generate_ids(merged, PROMPTS, greedy())  # fp32: the same tokens, not just close
    for prompt, tokens in zip(PROMPTS, batched):
        assert generate_ids(ort, [prompt], greedy()) == [tokens]  # left padding changed nothing

    # transformers' own generate agrees, stopping at the same tokens: the export's list in generation_config.json
    hf = AutoModelForCausalLM.from_pretrained(export_dir / "merged")
    eos = hf.generation_config.eos_token_id
    ours = generate_ids(ort, PROMPTS, SamplingParams(max_new_tokens=12, stop_ids=eos))
    for prompt, tokens in zip(PROMPTS, ours):
        ids = torch.tensor([prompt])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].tolist()
        end = next((i + 1 for i, t in enumerate(ref) if t in eos), None)
        assert ref[:end] == tokens


def test_adapter_unmerged_backend_agrees_with_merged(export_dir, merged):
    from lite_sft.serve.bench_candidates import _adapter_backend

    run_dir = json.loads((export_dir / "parity.json").read_text())["run_dir"]
    adapter = _adapter_backend(run_dir, "cpu", 1)
    from peft import PeftModel

    assert adapter.name == "torch-adapter" and isinstance(adapter.model, PeftModel)  # the adapter is not merged
    assert generate_ids(adapter, PROMPTS, greedy(8)) == generate_ids(merged, PROMPTS, greedy(8))


def test_long_prompts_are_prefilled_in_chunks_with_the_same_result(ort, monkeypatch):
    import lite_sft.serve.backends.ort as runtime

    whole = generate_ids(ort, PROMPTS, greedy(6))
    monkeypatch.setattr(runtime, "LOGITS_BUDGET_BYTES", 2 * len(PROMPTS) * ort.vocab_size * 4)  # 2 tokens a chunk
    assert generate_ids(ort, PROMPTS, greedy(6)) == whole


def test_kv_buffers_are_allocated_once_and_reused(ort):
    ort._spare.clear()
    generate_ids(ort, PROMPTS, greedy(20))
    pool = [t.data_ptr() for pair in ort._spare for buffers in pair for t in buffers.values()]
    assert len(ort._spare) == 1  # the batch gave its pair back
    generate_ids(ort, PROMPTS[1:], greedy(4))  # smaller: fits in what is there
    assert [t.data_ptr() for pair in ort._spare for buffers in pair for t in buffers.values()] == pool


def test_sampling_is_seeded_per_request_and_independent_of_batching(ort, merged):
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    alone = generate_ids(ort, [PROMPTS[0]], params)[0]
    mates = [params, SamplingParams(max_new_tokens=4, temperature=0.5, seed=1), SamplingParams(max_new_tokens=10)]
    assert generate_ids(ort, PROMPTS, mates)[0] == alone
    assert generate_ids(merged, [PROMPTS[0]], params)[0] == alone  # the same logits, the same draws
    other = generate_ids(ort, [PROMPTS[0]], SamplingParams(max_new_tokens=10, temperature=1.0, seed=8))[0]
    assert other != alone
    top1 = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=1, seed=3)
    assert generate_ids(ort, PROMPTS, top1) == generate_ids(ort, PROMPTS, greedy(10))


def test_repetition_penalty_stops_repeats(ort):
    prompt = [40, 41, 40, 41, 40, 41]
    out = generate_ids(ort, [prompt], SamplingParams(max_new_tokens=15, repetition_penalty=1e6))[0]
    seen = list(prompt)
    for token in out:
        assert token not in seen
        seen.append(token)


def test_stop_ids_max_tokens_and_cancellation(ort):
    plain = generate_ids(ort, PROMPTS, greedy(10))
    stop = plain[0][3]
    first = plain[0].index(stop)
    events = list(generate(ort, PROMPTS, SamplingParams(max_new_tokens=10, stop_ids=[stop])))
    ends = {e.index: e for e in events if e.finish_reason}
    assert ends[0].finish_reason == "stop" and ends[0].token_id == stop
    assert [e.token_id for e in events if e.index == 0] == plain[0][:first + 1]
    for i in (1, 2):
        expected = plain[i][:plain[i].index(stop) + 1] if stop in plain[i] else plain[i]
        assert [e.token_id for e in events if e.index == i] == expected
        assert ends[i].finish_reason == ("stop" if stop in plain[i] else "length")

    steps = {"n": 0}

    def cancelled(index):
        steps["n"] += index == 0
        return index == 1 and steps["n"] > 2

    events = list(generate(ort, PROMPTS, greedy(10), cancelled=cancelled))
    assert [e.finish_reason for e in events if e.index == 1][-1] == "cancelled"
    assert len([e for e in events if e.index == 1 and e.token_id is not None]) == 2
    # The rows left in the batch go on exactly as before (their cache rows were kept, the other dropped).
    assert [e.token_id for e in events if e.index == 0] == plain[0]
    assert [e.token_id for e in events if e.index == 2] == plain[2]


def test_stop_strings_cut_the_text_and_hold_back_partial_matches(ort, tokenizer):
    prompt = tokenizer("hello there")["input_ids"]
    events = list(generate(ort, [prompt], greedy(24), tokenizer))
    free = "".join(e.text for e in events)
    assert free == tokenizer.decode([e.token_id for e in events], skip_special_tokens=True) and len(free) > 6
    stop = free[3:6]
    events = list(generate(ort, [prompt], SamplingParams(max_new_tokens=24, stop=[stop, "zzzz-never"]), tokenizer))
    assert "".join(e.text for e in events) == free[:free.index(stop)]
    assert events[-1].finish_reason == "stop"

    class Chars:  # one character per token: shows exactly what is held back
        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

    stream = TextStream(Chars(), ["END"])
    out = [stream.push(ord(c)) for c in "abcEN"]
    assert "".join(t for t, _ in out) == "abc" and not any(s for _, s in out)  # "EN" may start "END"
    assert stream.push(ord("X")) == ("ENX", False)  # no longer a possible start: let it go
    assert stream.push(ord("E"))[0] == "" and stream.push(ord("N"))[0] == "" and stream.push(ord("D")) == ("", True)
    assert stream.flush() == ""  # the stop string itself is never sent


def test_incomplete_characters_are_not_streamed_half_made(tokenizer):
    ids = tokenizer("é€ ok")["input_ids"]  # byte-level BPE: the accented characters take several tokens
    stream = TextStream(tokenizer, [])
    pieces = [stream.push(i)[0] for i in ids]
    assert "".join(pieces) + stream.flush() == "é€ ok" and not any("\ufffd" in p for p in pieces)


def test_pad_left_and_invalid_requests(ort):
    ids, mask = pad_left([[7, 8, 9], [5]])
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ServeError, match="exceed the model's context of 256"):
        list(generate(ort, [[5] * 250], greedy(10)))
    with pytest.raises(ServeError, match="temperature -1.*top_p 0: above 0"):
        list(generate(ort, [[5]], SamplingParams(top_p=0, temperature=-1)))
    with pytest.raises(ServeError, match="empty"):
        list(generate(ort, [[]], greedy()))


def test_model_folders_are_found_and_bad_ones_explained(export_dir, tmp_path, tokenizer):
    import shutil

    assert resolve_model(export_dir) == ("onnx", export_dir / "onnx-int8")  # exported --quantize int8, and gated
    assert resolve_model(export_dir, "fp") == ("onnx", export_dir / "onnx")
    assert resolve_model(export_dir, "int8") == ("onnx", export_dir / "onnx-int8")
    assert resolve_model(export_dir / "merged") == ("torch", export_dir / "merged")
    # EOS </s> and the chat template's end of turn <|im_end|>, as the export wrote them
    assert stop_ids(export_dir / "onnx", tokenizer) == sorted([tokenizer.eos_token_id,
                                                               tokenizer.convert_tokens_to_ids("<|im_end|>")])
    with pytest.raises(ServeError, match="without onnx-int4/.*--quantize int4"):
        resolve_model(export_dir, "int4")
    run_dir = json.loads((export_dir / "parity.json").read_text())["run_dir"]
    with pytest.raises(ServeError, match="run directory: export it first"):
        resolve_model(run_dir)
    with pytest.raises(ServeError, match="is not an exported model"):
        resolve_model(tmp_path)
    with pytest.raises(ServeError, match="does not exist"):
        resolve_model(tmp_path / "nope")
    shutil.copytree(export_dir / "onnx", tmp_path / "no-tok")
    (tmp_path / "no-tok" / "tokenizer.json").unlink()
    with pytest.raises(ServeError, match="no tokenizer"):
        resolve_model(tmp_path / "no-tok")
    shutil.copytree(export_dir / "onnx", tmp_path / "broken")
    (tmp_path / "broken" / "model.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(ServeError, match="onnxruntime could not load .*broken/model.onnx"):
        OrtBackend(tmp_path / "broken", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ServeError, match="--device cuda"):
            OrtBackend(export_dir / "onnx", "cuda")


@pytest.mark.gpu
def test_cuda_provider_matches_cpu(export_dir, ort):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cuda = OrtBackend(export_dir / "onnx", "cuda")
    assert cuda.provider == "CUDAExecutionProvider"
    assert generate_ids(cuda, PROMPTS, greedy()) == generate_ids(ort, PROMPTS, greedy())


def test_bench_measures_every_backend_found(export_dir, tmp_path):
    from lite_sft.serve.bench import bench
    from lite_sft.options import BenchOptions
    from lite_sft.serve.bench_report import format_table, save

    report = bench(export_dir, BenchOptions([8], [4], [1, 2], runs=2, warmup=1, device="cpu", threads=1),
                   say=lambda _: None)
    rows = {b["backend"]: b for b in report["backends"]}
    assert set(rows) == {"torch-adapter", "torch-merged", "onnx-fp32", "onnx-fp16", "onnx-int8", "onnx-int4"}
    assert "fp16" in rows["onnx-fp16"]["skip"] and "not exported" in rows["onnx-int4"]["skip"]
    for name in ("torch-adapter", "torch-merged", "onnx-fp32", "onnx-int8"):
        assert [(r["batch"], r["prompt_len"], r["output_len"]) for r in rows[name]["rows"]] == [(1, 8, 4), (2, 8, 4)]
        r = rows[name]["rows"][0]
        assert 0 < r["ttft_ms"]["p50"] <= r["e2e_ms"]["p50"] and r["decode_tok_s"]["p99"] > 0
        assert rows[name]["peak_rss_bytes"] > 0 and rows[name]["weight_bytes"] > 0
    assert rows["onnx-int8"]["weight_bytes"] < 0.6 * rows["onnx-fp32"]["weight_bytes"]
    assert {t["backend"] for t in report["targets"]} == {"onnx-fp32", "onnx-int8"}
    table = format_table(report)
    assert "onnx-int8" in table and "target onnx-fp32 >= 2x" in table
    path, png = save(report, tmp_path)
    assert json.loads(path.read_text())["versions"]["onnxruntime"] and png.stat().st_size > 1000


def test_cli_bench_quick_and_errors(export_dir, tmp_path):
    result = runner.invoke(app, ["bench", str(export_dir), "--quick", "--backends", "torch-merged,onnx-fp32",
                                 "--device", "cpu", "--threads", "1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "decode/s" in result.output and "onnx-fp32" in result.output and "saved" in result.output
    assert len(list(tmp_path.glob("serve-*.json"))) == 1 and len(list(tmp_path.glob("serve-*.png"))) == 1
    bad = runner.invoke(app, ["bench", str(export_dir), "--backends", "onnx-fp64"])
    assert bad.exit_code == 2 and "onnx-fp64" in bad.output
    bad = runner.invoke(app, ["bench", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "does not exist" in bad.output
    bad = runner.invoke(app, ["bench", "--url", "http://127.0.0.1:9", "--duration", "0.5"])
    assert bad.exit_code == 2 and "no lite-sft server answers" in bad.output
    bad = runner.invoke(app, ["serve", str(tmp_path)])
    assert bad.exit_code == 2 and "not an exported model" in bad.output


def test_serving_imports_no_training_code():
    import subprocess
    import sys

    from test_layers import FORBIDDEN, layer_of

    # Serving may load the layers below it (core, tasks, demo, modeling: bench loads a tuned run with
    # lite_sft.model); tests/test_layers.py holds the source to that, and this the modules a process loads.
    probe = ("import sys, lite_sft.serve.server, lite_sft.serve.bench, lite_sft.serve.loadtest; "
             "print(' '.join(sorted(m for m in sys.modules if m.startswith('lite_sft.'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    loaded = out.split()
    assert "lite_sft.serve.server" in loaded
    training = [m for m in loaded if ("serve", layer_of(m)[1]) in FORBIDDEN]
    assert training == []  # not lite_sft.train, .checkpoint, .evaluate, .generate, nor lite_sft.export


def run_joined(backend, schedule: dict[int, list], steps: int = 40) -> dict:
    """Tokens per key from a Batch that the rows in `schedule` ({step: [(key, prompt, params)]}) join at those
    steps; also the cache length at every step (to see columns trimmed when a long row leaves)."""
    from lite_sft.serve.generate import Batch

    batch, out, lengths = Batch(backend), {}, []
    for step in range(steps):
        joining = schedule.get(step, [])
        batch.add([k for k, _, _ in joining], [p for _, p, _ in joining], [sp for _, _, sp in joining])
        if not batch and step > max(schedule):
            break
        for event in batch.step():
            out.setdefault(event.index, []).append(event.token_id)
        lengths.append(getattr(batch.state, "length", None))
    batch.close()
    return out, lengths


@pytest.mark.parametrize("which", ["ort", "merged"])
def test_rows_joining_a_running_batch_generate_what_they_generate_alone(which, request):
    """Continuous batching: a row that joins mid-batch (shorter than the cache, or longer, so the running rows
    are shifted right) and rows that leave early produce exactly the tokens each produces alone, greedy and
    sampled."""
    backend = request.getfixturevalue(which)
    sampled = SamplingParams(max_new_tokens=9, temperature=1.0, top_p=0.9, seed=5)
    long_prompt = list(range(30, 52))  # longer than the batch's cache when it joins
    rows = {"a": (PROMPTS[0], greedy(12)), "b": (PROMPTS[2], greedy(3)), "c": (PROMPTS[1], sampled),
            "d": (long_prompt, greedy(6)), "e": ([70, 71], SamplingParams(max_new_tokens=5, temperature=0.8, seed=1))}
    alone = {key: generate_ids(backend, [p], sp)[0] for key, (p, sp) in rows.items()}
    schedule = {0: [("a", *rows["a"]), ("b", *rows["b"])], 2: [("c", *rows["c"])], 3: [("d", *rows["d"])],
                5: [("e", *rows["e"])]}
    joined, _ = run_joined(backend, schedule)
    assert joined == alone


def test_a_batch_holds_no_more_columns_than_its_longest_live_row(ort):
    long_prompt = list(range(30, 60))
    schedule = {0: [("long", long_prompt, greedy(2)), ("short", [5], greedy(12))], 1: [("late", [6, 7], greedy(4))]}
    joined, lengths = run_joined(ort, schedule)
    assert joined["short"] == generate_ids(ort, [[5]], greedy(12))[0]
    assert lengths[0] == len(long_prompt) + 1
    # "long" leaves after step 1: the cache is trimmed to the 2 columns "short" and "late" use, then grows by one
    assert lengths[1:-1] == list(range(3, 13))


def test_kv_buffers_stay_bounded_while_rows_keep_joining(ort):
    from lite_sft.serve.generate import Batch

    ort._spare.clear()
    batch = Batch(ort)
    for step in range(60):
        batch.add([step], [PROMPTS[step % 3]], [greedy(1 + step % 7)])
        list(batch.step())
    batch.close()
    sizes = [t.numel() for pair in ort._spare for buffers in pair for t in buffers.values()]
    assert len(ort._spare) <= 3 and max(sizes) <= 8 * ort.kv_heads * (7 + 8) * ort.head_dim


# -- graphs with fused GroupQueryAttention (onnxruntime-genai's builder makes these) ---------------------------


def test_a_group_query_attention_graph_batches_rows_padded_on_the_right(gqa_dir):
    """GQA places each row's tokens from its mask's sum, so rows are right-padded: batched, joined mid-batch
    and alone give the same tokens. With the left padding torch.onnx's graphs take, they would not."""
    gqa = OrtBackend(gqa_dir, "cpu", threads=1)
    assert gqa.pad_right and not gqa.has_positions and gqa.head_dim == 16
    prompts = [[3, 9, 27, 17, 51, 8, 40, 2, 11, 5], [7, 1], [60, 33, 12, 4, 9, 21], [14]]
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, seed=4)
    alone = [generate_ids(gqa, [p], greedy(8))[0] for p in prompts]
    assert len({tuple(a) for a in alone}) > 1  # the rows really differ
    assert generate_ids(gqa, prompts, greedy(8)) == alone
    assert generate_ids(gqa, prompts, sampled) == [generate_ids(gqa, [p], sampled)[0] for p in prompts]
    schedule = {0: [(0, prompts[0], greedy(8)), (1, prompts[1], greedy(3))], 2: [(2, prompts[2], greedy(8))],
                4: [(3, prompts[3], greedy(8))]}
    joined, lengths = run_joined(gqa, schedule)
    assert [joined[k] for k in range(4)] == [alone[0], alone[1][:3], *alone[2:]]
    assert lengths[3] == 10 + 4 and lengths[-2] <= 8 + 8  # the long first row left: its columns went with it
    gqa.pad_right = False  # as torch.onnx's graphs are fed: left-padded
    assert generate_ids(gqa, prompts, greedy(8)) != alone


def test_a_builder_folder_without_config_says_what_to_copy(gqa_dir, tmp_path):
    (tmp_path / "model.onnx").symlink_to(gqa_dir / "model.onnx")
    (tmp_path / "genai_config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ServeError, match="onnxruntime-genai's builder output: copy config.json"):
        resolve_model(tmp_path)
