"""A run tuned before lite-sft moved to transformers 5 still exports and serves.

tests/data/run-transformers-4.57/ was written by lite-sft 0.1.0 on transformers 4.57.6, peft 0.21.2 and
tokenizers 0.22.2: `base/` a tiny Llama (2 layers, hidden 64, grouped-query attention) saved by that
transformers, `run/` three LoRA steps of it on the bundled skill data. Its files are as that version wrote
them, except that the folder it was written in reads /srv/lite-sft-4.57 in the paths they record, and the test
sets the base's path in config.yaml and adapter_config.json to where it copies the base.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import yaml

from lite_sft.export.pipeline import export_run
from lite_sft.options import ExportOptions

OLD = Path(__file__).parent / "data" / "run-transformers-4.57"


def old_run(tmp_path: Path) -> Path:
    shutil.copytree(OLD, tmp_path / "old")
    base, run = tmp_path / "old" / "base", tmp_path / "old" / "run"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["name_or_path"].endswith("/base")  # an absolute path on the machine that tuned it
    cfg["model"]["name_or_path"] = str(base)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    adapter = json.loads((run / "adapter_config.json").read_text())
    adapter["base_model_name_or_path"] = str(base)
    (run / "adapter_config.json").write_text(json.dumps(adapter))
    return run


def test_a_run_tuned_under_transformers_4_57_exports_and_serves(tmp_path):
    from lite_sft.serve.generate import SamplingParams, generate_ids
    from lite_sft.serve.backends.factory import load_backend

    run = old_run(tmp_path)
    out = tmp_path / "export"
    report = export_run(run, out, ExportOptions(quantize="int8", parity_prompts=2, parity_tokens=6),
                        say=lambda _: None)
    assert report["passed"] and [g["stage"] for g in report["gates"]] == ["merge", "onnx", "int8"]
    assert report["exporter"]["name"] == "builder"  # a Llama: the fused GroupQueryAttention graph
    assert "held-out examples in validation_split.json" in report["prompts"]["source"]  # the old run's own split
    backend, tokenizer = load_backend(out, "cpu", threads=1, variant="fp")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 reversed?"}],
                                           add_generation_prompt=True, return_dict=False)
    tokens = generate_ids(backend, [prompt], SamplingParams(max_new_tokens=4, stop_ids=report["stop_ids"]))[0]
    assert tokens and all(isinstance(t, int) for t in tokens)
    assert np.isfinite(report["gates"][1]["perplexity"])
