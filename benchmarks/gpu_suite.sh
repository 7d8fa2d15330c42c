#!/usr/bin/env bash
# Every GPU measurement lite-sft owes, in one script, for an offline GPU machine (../shared/gpu/README.md).
#
#   bash benchmarks/gpu_suite.sh pack                      # here: stage the wheels into .gpu/part-1..N, print the device calls
#   bash benchmarks/gpu_suite.sh run [--only train,plan,infer,peers] [--budget-s 480] [--out DIR]   # on the GPU machine
#   bash benchmarks/gpu_suite.sh dry-run                   # here, no GPU: the same steps on the CPU, smallest settings
#
# The steps, in order (STEPS below holds their exact commands):
#   train   benchmarks/train_vs_trl.py: Qwen2.5-0.5B's config, QLoRA, lite-sft vs TRL default; Llama-3.1-8B's config,
#           QLoRA, micro-batch 1, lite-sft alone (its target is a peak under 7 GiB). Cut to fit the device time:
#           128 + 16 examples (preset: 2000 + 200) and 32 + 8 for Llama (preset: 1000 + 100), the lite-sft row
#           alone (no ablation rows), TRL default alone for Qwen (no packed variants) and no TRL run for Llama.
#   plan    benchmarks/gpu_plan.py: `lite-sft plan` for each of those configs against the peak it measured
#   infer   benchmarks/gpu_serve.py: a decoder with Qwen2.5-0.5B's dimensions exported by onnxruntime-genai's model
#           builder for CUDA (`--dtype fp16 --quantize int4`: ONNX fp16 and int4 on the CUDA provider) vs PyTorch
#           bf16; an encoder classifier with all-MiniLM-L6-v2's and seq2seq.py's T5, ONNX vs PyTorch on CUDA.
#           Random weights throughout (no model hub there): honest time, no quality.
#   peers   benchmarks/peers.py --device cuda: lite-sft's runtime and onnxruntime-genai's on the same builder
#           folders (fp16, int4), both under /tmp/site's packages (onnxruntime-genai-cuda is a lite-sft dependency);
#           llama.cpp is a CPU peer, not run there; 3 timed runs a cell (its default: 5). Skipped, saying so,
#           where benchmarks/peers.py is not in the tree. The dry run runs both engines on the CPU, tiny model.
#
# `run` (after the staged parts are in /tmp/gpu-stage) installs them if /tmp/site is not there yet, checks the
# versions and that onnxruntime really runs on CUDAExecutionProvider, then runs each step under `timeout`
# (its own cap or what is left of --budget-s, whichever is less), keeps going when one fails, and after every
# step rewrites benchmarks/results/gpu_suite-<time>.json (status, seconds, the result files each step wrote) and,
# with --out (default $OUT where set), OUT/results.tgz holding every result file so far and OUT/logs.tgz: a
# run cut short still brings back what it measured. Unpack results.tgz into benchmarks/results/ and commit it.
# It prints a short table last.
#
# `dry-run` copies the working tree to a temporary folder (so no result lands in benchmarks/results), runs every
# step there on the CPU with one thread and each benchmark's smallest settings, and fails if any step fails.
# It takes about 6 minutes on two busy cores (tests/test_gpu_suite.py checks the commands, not the run).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SITE=/tmp/site              # install.sh's target (../shared/gpu/README.md)
STAGE=/tmp/gpu-stage

# What the GPU machine lacks, one version each, as constraints.txt pins them (pip installs these with --no-deps):
# onnxruntime-gpu and onnxruntime-genai-cuda (export's model builder and the peers' runtime: it needs only numpy
# and onnxruntime-gpu), onnx-ir and onnxscript (torch.onnx's exporter for the encoders and seq2seq), bitsandbytes,
# transformers 5.25 (the machine has another 5.x) with what it and huggingface_hub 2.4 need in versions the machine
# may not have: tokenizers 0.23, kernels (and its tomlkit), safetensors >= 0.8, regex >= 2025.10, hf-xet,
# httpx2 and httpcore2 (huggingface_hub 2's HTTP client; truststore and idna >= 3.18 theirs), click >= 8.4.2;
# datasets and its dill, multiprocess and fsspec (datasets wants <= 2026.9.0) for lite-sft and trl; nltk
# (rouge-score's, for the seq2seq task's ROUGE); peft pinned. No optimum: lite-sft no longer uses it.
PACKAGES=('onnxruntime-gpu==1.31.1' 'onnxruntime-genai-cuda==0.18.0' 'onnx-ir==1.1.0' 'onnxscript==0.7.2'
          'bitsandbytes==0.50.2' 'transformers==5.25.0' 'tokenizers==0.23.3' 'huggingface_hub==2.4.0'
          'kernels==0.19.1' 'tomlkit==0.15.3' 'safetensors==0.8.0' 'regex==2026.12.2' 'hf-xet==1.8.0'
          'httpx2==2.17.0' 'httpcore2==2.17.0' 'truststore==0.10.5' 'idna==3.20' 'click==8.5.1' 'peft==0.21.2'
          'trl==1.16.0' 'datasets==5.2.0' 'dill==0.4.1' 'multiprocess==0.70.19' 'fsspec==2026.9.0'
          'nltk==3.10.4')
SDISTS=('rouge-score==0.1.2')  # published as source only: built into a wheel here and put in the last part

# name | group | cap seconds on the GPU | GPU command | dry-run command. @WORK@ is the suite's scratch folder,
# @PLAN_FROM@ "--from RESULT WORK_DIR" per training result.
STEPS='
train-qwen|train|240|benchmarks/train_vs_trl.py --model qwen0.5b --quant 4bit --examples 128 --val-examples 16 --rows lite-sft --trl default --work-dir @WORK@/qwen|benchmarks/train_vs_trl.py --quick --quant none --examples 16 --val-examples 4 --rows lite-sft --trl default --work-dir @WORK@/qwen
train-llama8b|train|300|benchmarks/train_vs_trl.py --model llama8b --quant 4bit --micro-batch 1 --examples 32 --val-examples 8 --rows lite-sft --trl none --work-dir @WORK@/llama8b|benchmarks/train_vs_trl.py --quick --quant none --micro-batch 1 --examples 16 --val-examples 4 --rows lite-sft --trl none --work-dir @WORK@/llama8b
plan|plan|60|benchmarks/gpu_plan.py @PLAN_FROM@|benchmarks/gpu_plan.py @PLAN_FROM@
infer-decoder|infer|300|benchmarks/gpu_serve.py --kind decoder --device cuda --work @WORK@/serve|benchmarks/gpu_serve.py --kind decoder --device cpu --quick --work @WORK@/serve
infer-encoder|infer|120|benchmarks/gpu_serve.py --kind encoder --device cuda --work @WORK@/serve|benchmarks/gpu_serve.py --kind encoder --device cpu --quick --work @WORK@/serve
infer-seq2seq|infer|120|benchmarks/gpu_serve.py --kind seq2seq --device cuda --work @WORK@/serve|benchmarks/gpu_serve.py --kind seq2seq --device cpu --quick --work @WORK@/serve
peers|peers|300|benchmarks/peers.py --device cuda --peers genai --repeats 3 --work-dir @WORK@/peers|benchmarks/peers.py --device cpu --peers genai --quick --precisions fp32,int8 --work-dir @WORK@/peers
'

usage() {
  cat <<'EOF'
usage: bash benchmarks/gpu_suite.sh pack
       bash benchmarks/gpu_suite.sh run [--only train,plan,infer,peers] [--budget-s N] [--out DIR]
       bash benchmarks/gpu_suite.sh dry-run [--only GROUPS]

  pack      stage every wheel the GPU machine lacks into .gpu/part-1..N (at most 56 MiB each) and print the
            device calls that carry them, one part per call, and the final call that runs the suite
  run       on the GPU machine: install the staged wheels, check versions and the CUDA provider, run each
            step with a timeout, save results as it goes (--out: also results.tgz and logs.tgz there)
  dry-run   on a CPU, in a copy of the working tree: every step with its smallest settings; fails if one fails

  --only     comma-separated groups: train, plan, infer, peers (default: all, in that order)
  --budget-s seconds for all the steps together (run: 480; a step gets its own cap or what is left)
  --out      folder for results.tgz and logs.tgz (default: $OUT where set)
EOF
}

# --- pack (here) -------------------------------------------------------------------------------------

pack() {
  cd "$ROOT" || exit 1
  local packer=../shared/gpu/pack-wheels
  [ -x "$packer" ] || { echo "gpu_suite: $packer not found (see ../shared/gpu/README.md)" >&2; exit 1; }
  "$packer" .gpu "${PACKAGES[@]}" || exit 1
  local last; last=$(ls -d .gpu/part-* | sort -t- -k2 -n | tail -1)
  local built; built=$(mktemp -d)
  python3 -m pip wheel -q --no-deps -w "$built" "${SDISTS[@]}" || exit 1
  mv "$built"/*.whl "$last"/ && rmdir "$built"
  local n; n=$(ls -d .gpu/part-* | wc -l)
  echo
  echo "$n part(s); $(du -sh .gpu | cut -f1) in all. Device calls, in order, each right after the last (the machine"
  echo "goes back after 30 s idle); the last carries the last part, installs and runs the suite:"
  local i
  for ((i = 1; i < n; i++)); do
    echo "  run(carry=[\".gpu/part-$i\"], timeout_s=120, command=\"mkdir -p $STAGE && cp .gpu/part-$i/* $STAGE/\")"
  done
  echo "  run(carry=[\".gpu/part-$n\"], timeout_s=600, command=\"mkdir -p $STAGE && cp .gpu/part-$n/* $STAGE/ && bash benchmarks/gpu_suite.sh run --budget-s 480 --out \$OUT\")"
  echo "then, if its table says steps were cut for time and device time is left:"
  echo "  run(timeout_s=600, command=\"bash benchmarks/gpu_suite.sh run --only GROUPS --budget-s 480 --out \$OUT\")"
  echo "and here: tar -xzf FILES_AT/results.tgz -C benchmarks/results, then commit them."
}

# --- the environment ---------------------------------------------------------------------------------

# lite_sft.export and lite_sft.serve live in export/ and serve/ (pyproject's package-dir), so the tree is not
# importable as it stands: a folder of links gives Python the installed layout without installing anything.
mirror() {
  local src=$1/lite_sft
  rm -rf "$src" && mkdir -p "$src"
  local f
  for f in "$PWD"/lite_sft/*; do ln -s "$f" "$src/$(basename "$f")"; done
  ln -s "$PWD/export" "$src/export"
  ln -s "$PWD/serve" "$src/serve"
}

gpu_env() {
  if [ ! -d "$SITE" ]; then
    [ -f "$STAGE/install.sh" ] || { echo "gpu_suite: no $SITE and no $STAGE/install.sh: carry the parts first (pack)" >&2; exit 1; }
    bash "$STAGE/install.sh" || exit 1
  fi
  mirror /tmp/lite-sft-src
  export PYTHONPATH=$SITE:/tmp/lite-sft-src:$PWD
  # onnxruntime-gpu (and onnxruntime-genai-cuda through it) loads cuBLAS and cuDNN by name; the machine has them
  # as torch's nvidia-* wheels.
  local libs
  libs=$(python3 -c 'import glob, site; print(":".join(sorted(d for p in site.getsitepackages() for d in glob.glob(p + "/nvidia/**/lib", recursive=True))))')
  export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  PY=python3
}

check() {  # versions, and a session that really runs on the CUDA provider (not one that fell back to the CPU)
  local device=$1
  "$PY" - "$device" <<'EOF'
import importlib.metadata as meta, sys
device = sys.argv[1]
for name in ("torch", "transformers", "tokenizers", "huggingface_hub", "peft", "bitsandbytes", "onnx", "onnx-ir",
             "onnxscript", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai-cuda", "trl", "datasets"):
    try:
        print(f"{name:<16} {meta.version(name)}")
    except meta.PackageNotFoundError:
        print(f"{name:<16} missing")
import onnx, onnxruntime as ort, torch, transformers
import onnxruntime_genai as og  # export's model builder and the peers' runtime: it loads onnxruntime's library
print("providers       ", ", ".join(ort.get_available_providers()))
print("onnxruntime-genai", og.__version__)
assert transformers.__version__.startswith("5.25."), f"transformers {transformers.__version__}: /tmp/site's 5.25 should win"
if device == "cuda":
    assert torch.cuda.is_available(), "torch sees no GPU"
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Add", ["x", "x"], ["y"])], "add", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 9
    session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
    assert session.get_providers()[0] == "CUDAExecutionProvider", f"fell back to {session.get_providers()}"
    print("CUDA provider    runs", torch.cuda.get_device_name(0))
EOF
}

# --- the steps -----------------------------------------------------------------------------------------

plan_from() {  # "--from RESULT WORK_DIR" for every training result this suite wrote
  local line out=""
  while IFS='|' read -r name status secs files; do
    case $name in train-*) ;; *) continue ;; esac
    for f in $files; do
      case $f in train_vs_trl-*) out+=" --from benchmarks/results/$f $WORK/${name#train-}" ;; esac
    done
  done < "$STATE"
  echo "$out"
}

record() {  # name | status | seconds | result files
  echo "$1|$2|$3|$4" >> "$STATE"
}

summary() {
  "$PY" - "$STATE" "$SUMMARY" "$MODE" "$COMMAND" "$DEVICE" <<'EOF'
import json, subprocess, sys
from datetime import datetime, timezone
state, out, mode, command, device = sys.argv[1:]
steps = []
for line in open(state):
    name, status, secs, files = line.rstrip("\n").split("|", 3)
    steps.append({"step": name, "status": status, "seconds": float(secs), "results": files.split()})
info = {"type": device}
if device == "cuda":
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True)
    info["nvidia_smi"] = smi.stdout.strip()
import importlib.metadata as meta
versions = {}
for name in ("torch", "transformers", "peft", "bitsandbytes", "onnxscript", "onnxruntime", "onnxruntime-gpu",
             "onnxruntime-genai-cuda", "trl"):
    try:
        versions[name] = meta.version(name)
    except meta.PackageNotFoundError:
        pass
json.dump({"benchmark": "gpu_suite", "mode": mode, "command": command, "device": info, "versions": versions,
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "note": "each step's figures are in its own result file; random-weight models throughout",
           "steps": steps}, open(out, "w"), indent=2)
EOF
}

bring_back() {  # what has been measured so far, into --out
  [ -n "$OUT_DIR" ] || return 0
  mkdir -p "$OUT_DIR"
  local files; files=$(cut -d'|' -f4 "$STATE" | tr ' ' '\n' | grep -v '^$')
  tar -czf "$OUT_DIR/results.tgz" -C benchmarks/results $(basename "$SUMMARY") $files 2>/dev/null
  tar -czf "$OUT_DIR/logs.tgz" -C "$LOGS" . 2>/dev/null
}

run_steps() {
  local start=$SECONDS failed=0
  local name group cap gpu dry
  while IFS='|' read -r name group cap gpu dry; do
    [ -n "$name" ] || continue
    [[ ",$ONLY," == *",$group,"* ]] || continue
    local args=$gpu t=$cap
    [ "$MODE" = dry-run ] && args=$dry
    local script=${args%% *}
    if [ ! -f "$script" ]; then
      echo "== $name: skipped, $script is not in this tree"
      record "$name" "skipped: $script absent" 0 ""; summary; continue
    fi
    if [ "$name" = plan ]; then
      local from; from=$(plan_from)
      if [ -z "$from" ]; then record plan "skipped: no training result" 0 ""; summary; continue; fi
      args=${args//@PLAN_FROM@/$from}
    fi
    args=${args//@WORK@/$WORK}
    if [ -n "$BUDGET" ]; then
      local left=$((BUDGET - (SECONDS - start)))
      if [ "$left" -lt 30 ]; then
        echo "== $name: skipped, out of time (--budget-s $BUDGET)"
        record "$name" "skipped: out of time" 0 ""; summary; bring_back; continue
      fi
      [ "$left" -lt "$t" ] && t=$left
    fi
    local before; before=$(ls benchmarks/results)
    echo "== $name ($(date -u +%H:%M:%S), at most ${t}s): $PY $args"
    local began=$SECONDS rc
    # shellcheck disable=SC2086  # the step's arguments split on spaces; none holds one
    PYTHONUNBUFFERED=1 timeout -k 10 "$t" "$PY" $args > "$LOGS/$name.log" 2>&1 < /dev/null
    rc=$?
    local new; new=$(comm -13 <(echo "$before") <(ls benchmarks/results) | grep -v '^gpu_suite-' | tr '\n' ' ')
    local status=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="timeout after ${t}s"; failed=1
    elif [ "$rc" -ne 0 ]; then status="failed (exit $rc): $(grep -v '^\s*$' "$LOGS/$name.log" | tail -1 | tr '|' '/' | cut -c1-160)"; failed=1
    fi
    [ "$status" = ok ] || tail -n 15 "$LOGS/$name.log"
    record "$name" "$status" $((SECONDS - began)) "$new"
    summary; bring_back
  done <<< "$STEPS"
  return $failed
}

table() {
  echo
  printf '%-14s %7s  %-58s %s\n' step seconds status results
  while IFS='|' read -r name status secs files; do
    printf '%-14s %7s  %-58s %s\n' "$name" "$secs" "${status:0:58}" "$files"
  done < "$STATE"
  echo "summary: benchmarks/results/$(basename "$SUMMARY")${OUT_DIR:+; results.tgz and logs.tgz in $OUT_DIR}"
}

main() {
  local verb=${1:-}; shift || true
  ONLY=train,plan,infer,peers BUDGET="" OUT_DIR=${OUT:-}
  while [ $# -gt 0 ]; do
    case $1 in
      --only) ONLY=$2; shift 2 ;;
      --budget-s) BUDGET=$2; shift 2 ;;
      --out) OUT_DIR=$2; shift 2 ;;
      -h|--help) usage; exit 0 ;;
      *) echo "gpu_suite: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
  done
  local g
  for g in ${ONLY//,/ }; do
    case $g in train|plan|infer|peers) ;; *) echo "gpu_suite: unknown group $g (train, plan, infer, peers)" >&2; exit 2 ;; esac
  done
  case $verb in
    pack) pack; exit ;;
    run) MODE=run DEVICE=cuda; cd "$ROOT" || exit 1; BUDGET=${BUDGET:-480}; gpu_env ;;
    dry-run)
      MODE=dry-run DEVICE=cpu OUT_DIR=""
      local copy; copy=$(mktemp -d -t gpu-suite-dry.XXXXXX)
      (cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 tar -cf - 2>/dev/null) | tar -xf - -C "$copy"
      cd "$copy" || exit 1
      PY=$ROOT/.venv/bin/python; [ -x "$PY" ] || PY=python3
      mirror "$copy/.lite-sft-src"
      export PYTHONPATH=$copy/.lite-sft-src:$copy OMP_NUM_THREADS=1
      echo "dry run in $copy (a copy of the working tree: nothing lands in benchmarks/results)" ;;
    -h|--help|"") usage; [ -n "$verb" ]; exit ;;
    *) echo "gpu_suite: unknown command $verb" >&2; usage >&2; exit 2 ;;
  esac
  WORK=$(mktemp -d -t gpu-suite-work.XXXXXX)
  LOGS=$WORK/logs; mkdir -p "$LOGS"
  STATE=$WORK/state; : > "$STATE"
  SUMMARY=$PWD/benchmarks/results/gpu_suite-$(date -u +%Y%m%d-%H%M%S).json
  COMMAND="bash benchmarks/gpu_suite.sh $verb${ONLY:+ --only $ONLY}${BUDGET:+ --budget-s $BUDGET}"
  echo "== check"
  if ! check "$DEVICE" > "$LOGS/check.log" 2>&1; then
    cat "$LOGS/check.log"; record check "failed: $(tail -1 "$LOGS/check.log" | tr '|' '/' | cut -c1-160)" 0 ""
  else
    cat "$LOGS/check.log"; record check ok 0 ""
  fi
  summary
  run_steps; local failed=$?
  grep -q '^check|failed' "$STATE" && failed=1
  table
  [ "$MODE" = dry-run ] && [ "$failed" -ne 0 ] && { echo "dry run FAILED: logs in $LOGS" >&2; exit 1; }
  exit 0
}

main "$@"
