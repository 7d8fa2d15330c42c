"""benchmarks/gpu_suite.sh without a GPU and without running it: the script parses, says how it is used, passes
each benchmark only options that benchmark has, and stages every package the offline GPU machine lacks, at the
versions lite-sft pins. The CPU dry run (`bash benchmarks/gpu_suite.sh dry-run`, minutes) is run by hand."""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
TEXT = SUITE.read_text()

# What ../shared/gpu/README.md says the GPU machine lacks (onnxruntime-genai-cuda: export's model builder and the
# peer comparison's runtime), and the requirements of those that the machine lacks or has in a version they refuse
# (see PACKAGES' comment in the script): transformers 5.25 wants huggingface_hub 2.4 and kernels, the hub httpx2.
LACKING = {"transformers", "bitsandbytes", "onnx-ir", "onnxscript", "onnxruntime-gpu", "onnxruntime-genai-cuda",
           "trl", "tokenizers", "huggingface-hub", "kernels", "httpx2", "httpcore2", "datasets", "dill",
           "multiprocess", "fsspec", "peft", "nltk", "rouge-score"}
GONE = {"optimum", "optimum-onnx"}  # lite-sft no longer imports them; staged, they would only shadow nothing


def bash(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SUITE), *args], capture_output=True, text=True, cwd=ROOT, timeout=30)


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def array(name: str) -> list[str]:
    """A bash array assignment of the script, e.g. PACKAGES=('a==1' 'b==2'), as a list."""
    body = re.search(rf"^{name}=\((.*?)\)", TEXT, re.S | re.M).group(1)
    return shlex.split(body, comments=True)


def steps() -> list[dict]:
    body = re.search(r"^STEPS='\n(.*?)^'", TEXT, re.S | re.M).group(1)
    rows = [line.split("|") for line in body.splitlines() if line.strip()]
    return [{"name": r[0], "group": r[1], "cap": int(r[2]), "gpu": r[3].split(), "dry": r[4].split()} for r in rows]


@functools.cache
def help_text(script: str) -> str:
    done = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SUITE)], capture_output=True).returncode == 0


def test_usage_names_the_three_commands():
    done = bash("--help")
    assert done.returncode == 0
    for word in ("pack", "run", "dry-run", "--only", "--budget-s", "--out"):
        assert word in done.stdout
    assert bash().returncode != 0  # no command: usage, and a failure
    assert bash("measure").returncode == 2
    assert bash("run", "--only", "train,speed").returncode == 2  # an unknown group, refused before anything runs


def test_steps_cover_every_owed_measurement_in_order():
    table = steps()
    assert [s["group"] for s in table] == ["train", "train", "plan", "infer", "infer", "infer", "peers"]
    gpu = [" ".join(s["gpu"]) for s in table]
    assert "--model qwen0.5b --quant 4bit" in gpu[0]
    assert "--model llama8b --quant 4bit --micro-batch 1" in gpu[1]
    assert all("--device cuda" in g for g in gpu[3:])
    # onnxruntime-genai runs in lite-sft's own interpreter (/tmp/site), so the peers step names no other Python
    assert "--peers genai" in gpu[6] and not any("--peer-" in " ".join(s["gpu"] + s["dry"]) for s in table)
    assert "--peers genai" in " ".join(table[6]["dry"])  # the dry run runs onnxruntime-genai too, on the CPU
    assert all("--device cpu" in " ".join(s["dry"]) for s in table[3:])  # the dry run never asks for a GPU
    # One step's cap never exceeds one device command's 10 minutes.
    assert all(0 < s["cap"] <= 600 for s in table)


@pytest.mark.parametrize("step", steps(), ids=lambda s: s["name"])
def test_every_option_passed_exists_in_the_benchmark(step):
    for command in (step["gpu"], step["dry"]):
        script = command[0]
        if not (ROOT / script).is_file():
            assert step["name"] == "peers", f"{script} is missing"  # the suite skips peers.py when absent
            continue
        text = help_text(script)
        for option in (a for a in command[1:] if a.startswith("--")):
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), f"{script} has no {option}"


def test_pack_stages_every_package_the_gpu_machine_lacks_at_the_pinned_versions():
    specs = array("PACKAGES") + array("SDISTS")
    pinned = dict(s.split("==") for s in specs)
    names = [norm(n) for n in pinned]
    assert len(names) == len(set(names)), "one version of each"
    assert LACKING <= set(names), f"not staged: {sorted(LACKING - set(names))}"
    assert not GONE & set(names)
    constraints = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            constraints[norm(name)] = version.strip()
    for name, version in pinned.items():
        assert norm(name) in constraints, f"{name} is staged but constraints.txt does not pin it"
        assert constraints[norm(name)] == version, f"{name}: staged {version}, constraints.txt pins {constraints[norm(name)]}"


def test_plan_config_nests_dotted_overrides(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from gpu_plan import nest

    assert nest({"train.lr": 2e-4, "model.quant": "4bit", "output_dir": "x"}) == {
        "train": {"lr": 2e-4}, "model": {"quant": "4bit"}, "output_dir": "x"}
