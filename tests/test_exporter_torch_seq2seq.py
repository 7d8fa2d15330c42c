"""The seq2seq exporter (export/exporters/torch_seq2seq.py) on tiny random T5 and BART: the folder it writes, the
parity gate's runner against PyTorch, greedy decoding through the server's backend against transformers' generate
(alone and batched), and the int8 / int4 quantised folders.

The models get large random weights, so that greedy decoding wanders through the vocabulary instead of repeating
one token (the tiny bases do), and rows stop at different steps.
"""

import json
import shutil

import numpy as np
import pytest
import torch

from lite_sft.export import ExportError
from lite_sft.export.exporters import candidates
from lite_sft.export.exporters import torch_seq2seq as exporter
from lite_sft.export.parity_tasks import TaskReference, ort_batch_logits, ort_logits
from lite_sft.export.quantize import quantize
from lite_sft.serve import ServeError
from lite_sft.serve.generate import SamplingParams, generate_ids
from lite_sft.serve.backends.factory import load_backend
from lite_sft.serve.backends.folder import load_tokenizer
from lite_sft.serve.backends.seq2seq import Seq2SeqBackend

SOURCES = ("translate : un deux trois", "copy : one", "reverse : nine eight seven six five four three", "zero")


def exported(root, base, seed: int):
    """An export OUT as `lite-sft export` lays it out: merged/, onnx/ (this exporter) and parity.json."""
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    model.save_pretrained(root / "merged")
    load_tokenizer(base).save_pretrained(root / "merged")
    exporter.export(model, root / "merged", root / "onnx", "fp32")
    (root / "parity.json").write_text(json.dumps({"task": "seq2seq", "passed": True}))
    return root


@pytest.fixture(scope="module")
def t5_out(tmp_path_factory, tiny_t5_dir):
    return exported(tmp_path_factory.mktemp("t5-out"), tiny_t5_dir, 1)


@pytest.fixture(scope="module")
def bart_out(tmp_path_factory, tiny_bart_dir):
    return exported(tmp_path_factory.mktemp("bart-out"), tiny_bart_dir, 2)


@pytest.fixture(params=["t5", "bart"])
def out(request):
    return request.getfixturevalue(f"{request.param}_out")


def hf_generate(folder, sources: list[list[int]], n: int, eos: list[int]) -> list[list[int]]:
    """transformers' greedy tokens for each source alone, up to and including the first of `eos`."""
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    made = []
    for ids in sources:
        # forced_eos_token_id would force EOS at the last step; the server ends such a row with "length" instead.
        tokens = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                                pad_token_id=model.config.pad_token_id, forced_eos_token_id=None)[0, 1:].tolist()
        made.append(tokens[:next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))])
    return made


def test_the_folder_holds_two_graphs_config_and_tokenizer_but_no_weights(out):
    names = {p.name for p in (out / "onnx").iterdir()}
    assert {"encoder_model.onnx", "decoder_model.onnx", "config.json", "generation_config.json"} <= names
    assert not any(n.endswith((".safetensors", ".bin")) for n in names)
    assert load_tokenizer(out / "onnx")("copy : one")["input_ids"] == load_tokenizer(out / "merged")("copy : one")["input_ids"]
    assert json.loads((out / "onnx" / "config.json").read_text()) == json.loads((out / "merged" / "config.json").read_text())
    import onnx

    decoder = onnx.load(str(out / "onnx" / "decoder_model.onnx"), load_external_data=False).graph
    assert [i.name for i in decoder.input] == exporter.decoder_inputs(2)
    assert [o.name for o in decoder.output] == ["logits"] + exporter.cache_names(2, "present", "decoder")
    # Every weight is in one graph only: the decoder computes no cross-attention keys or values (the encoder does).
    encoder = onnx.load(str(out / "onnx" / "encoder_model.onnx"), load_external_data=False).graph
    assert [o.name for o in encoder.output] == exporter.cache_names(2, "present", "encoder")
    # The encoder graph kept only the cross-attention projections of the decoder step it ran: beyond the model's
    # weights, only the token embedding comes twice (both graphs read it) and the output layer tied to it.
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(out / "merged")
    weights = sum(int(np.prod(t.dims)) for g in (encoder, decoder) for t in g.initializer)
    assert weights <= model.num_parameters() + 2 * model.get_input_embeddings().weight.numel() + 1000


def reference(folder, sources: list[str]) -> TaskReference:
    """What make_reference gives the gate: each source alone, decoder ids of one length, and the batch."""
    tokenizer = load_tokenizer(folder)
    inputs = [dict(tokenizer(s, return_tensors="pt")) for s in sources]
    generator = torch.Generator().manual_seed(1)
    ids = [torch.randint(3, len(tokenizer), (1, 6), generator=generator) for _ in sources]
    batch = dict(tokenizer(sources, return_tensors="pt", padding=True))  # right-padded, as the task collates
    return TaskReference("seq2seq", inputs, [], ids, list(range(len(sources))), batch)


def test_the_gate_runner_gives_pytorchs_teacher_forced_logits(out):
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(out / "merged").eval()
    ref = reference(out / "merged", list(SOURCES[:3]))
    assert ref.batch["attention_mask"].min() == 0  # the batch pads its shorter sources
    with torch.no_grad():
        expected = [model(**inputs, decoder_input_ids=ids).logits[0] for inputs, ids in zip(ref.inputs, ref.decoder_ids)]
    runner = exporter.open(out / "onnx")
    for got in (ort_logits(runner, ref), ort_batch_logits(runner, ref)):
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g.shape == e.shape and (g - e).abs().max() < 1e-4


def test_greedy_through_the_backend_equals_transformers_generate(out):
    tokenizer = load_tokenizer(out / "onnx")
    sources = [tokenizer(t)["input_ids"] for t in SOURCES]
    # Stop at a token the model makes often as well as at EOS, so rows finish at different steps and leave the batch.
    common = np.bincount(sum(hf_generate(out / "merged", sources, 12, [-1]), [])).argsort()[-2]
    eos = sorted({tokenizer.eos_token_id, int(common)})
    expected = hf_generate(out / "merged", sources, 12, eos)
    assert len({len(e) for e in expected}) > 1, expected
    backend, _ = load_backend(out, "cpu", threads=1)
    assert isinstance(backend, Seq2SeqBackend) and backend.precision == "fp32" and "onnx" in backend.name
    assert generate_ids(backend, sources, SamplingParams(12, stop_ids=eos)) == expected
    for source, tokens in zip(sources, expected):
        assert generate_ids(backend, [source], SamplingParams(12, stop_ids=eos)) == [tokens]


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantised_folders_load_and_decode(t5_out, method, tmp_path):
    dst = tmp_path / f"onnx-{method}"
    quantize(t5_out / "onnx", dst, method, 16)
    graphs = sorted(p.name for p in dst.glob("*.onnx"))
    assert graphs == ["decoder_model.onnx", "encoder_model.onnx"]
    assert sum(p.stat().st_size for p in dst.glob("*.onnx")) < sum(p.stat().st_size for p in (t5_out / "onnx").glob("*.onnx"))
    import onnx

    ops = {n.op_type for g in graphs for n in onnx.load(str(dst / g)).graph.node}
    assert ("MatMulInteger" if method == "int8" else "MatMulNBits") in ops
    backend = Seq2SeqBackend.from_onnx(dst, "cpu", 1)
    assert backend.precision == method
    tokenizer = load_tokenizer(dst)
    sources = [tokenizer(t)["input_ids"] for t in SOURCES]
    made = generate_ids(backend, sources, SamplingParams(8, stop_ids=[-1]))
    assert [len(m) for m in made] == [8] * len(SOURCES) and all(0 <= t < len(tokenizer) for m in made for t in m)
    # The quantised graph still computes the same function, roughly: its first step's logits follow fp32's.
    fp = Seq2SeqBackend.from_onnx(t5_out / "onnx", "cpu", 1)
    ids, mask = np.array([sources[0]]), np.ones((1, len(sources[0])), dtype=np.int64)
    a, b = backend.prefill(ids, mask, 8)[0], fp.prefill(ids, mask, 8)[0]
    assert np.corrcoef(a[0], b[0])[0, 1] > 0.9


def test_refusals_and_bad_folders_are_one_clear_line(tiny_t5_dir, tiny_bert_dir, t5_out, tmp_path):
    from transformers import AutoConfig

    t5 = AutoConfig.from_pretrained(tiny_t5_dir)
    assert exporter.refuses(t5, "fp32") is None and [r.module for r in candidates("seq2seq", t5, "fp32")] == ["torch_seq2seq"]
    assert "fp32 only" in exporter.refuses(t5, "fp16") and "--quantize" in exporter.refuses(t5, "fp16")
    assert "not an encoder-decoder" in exporter.refuses(AutoConfig.from_pretrained(tiny_bert_dir), "fp32")
    with pytest.raises(ExportError, match="no ONNX exporter takes this t5 model for seq2seq"):
        candidates("seq2seq", t5, "fp16")
    with pytest.raises(ExportError, match="fp32 only"):
        exporter.export(_model(tiny_t5_dir), tiny_t5_dir, tmp_path / "fp16", "fp16")
    broken = shutil.copytree(t5_out / "onnx", tmp_path / "broken")
    (broken / "decoder_model.onnx").unlink()
    with pytest.raises(ExportError, match="onnxruntime could not load the exported broken/"):
        exporter.open(broken)
    with pytest.raises(ServeError, match="onnxruntime could not load .*decoder_model.onnx"):
        Seq2SeqBackend.from_onnx(broken, "cpu", 1)


def _model(folder):
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(folder)
