#!/usr/bin/env bash
# Everything gpubp checks on a GPU, in one command, without network:
#   benchmarks/gpu_check.sh OUTDIR [--quick]
# 1. the GPU tests: the backend-vs-reference matrix for cupy and tests/test_cupy_backend.py
#    (junit XML and log), plus the kernel compile tests and the cuBLAS binding checks;
# 2. compute-sanitizer memcheck and racecheck on benchmarks/sanitize_step.py (where installed);
# 3. the GPU benchmark benchmarks/gpu_step.py;
# then OUTDIR/summary.json and OUTDIR/summary.txt (date, device, git hash of kernels/, results).
# --quick: small benchmark shapes only (a smoke test of the script itself).
set -uo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 OUTDIR [--quick]" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
QUICK=${2:-}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" CUPY_TF32=0
status=0

python - <<'PY' || { echo "gpu_check: the cupy backend cannot run here" >&2; exit 1; }
import gpubp, sys
why = gpubp.backend_status()["cupy"]
print("cupy backend:", why or "available")
sys.exit(1 if why else 0)
PY

echo "== 1. GPU tests"
python -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT/tests.xml" \
    tests/test_cupy_backend.py tests/test_cuda_kernels.py tests/test_cublas_binding.py \
    "tests/test_backends.py" "tests/test_model.py" -k "cupy or cuda or kernel or cublas" \
    >"$OUT/tests.log" 2>&1 || status=1
tail -3 "$OUT/tests.log"

echo "== 2. compute-sanitizer"
if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck; do
        GPUBP_CUDA_GRAPHS=1 compute-sanitizer --tool "$tool" --error-exitcode 99 \
            python benchmarks/sanitize_step.py >"$OUT/sanitizer-$tool.log" 2>&1
        rc=$?
        echo "$tool: exit $rc ($(grep -c 'ERROR SUMMARY: 0 errors' "$OUT/sanitizer-$tool.log") clean summaries)"
        [ $rc -eq 0 ] || status=1
    done
else
    echo "compute-sanitizer not found (it ships with the CUDA toolkit); skipped" | tee "$OUT/sanitizer-missing.log"
fi

echo "== 3. benchmark"
python benchmarks/gpu_step.py "$OUT" $QUICK >"$OUT/bench.log" 2>&1 || status=1
tail -25 "$OUT/bench.log"

python - "$OUT" "$status" <<'PY'
import json, pathlib, re, subprocess, sys, time, xml.etree.ElementTree as ET
out, status = pathlib.Path(sys.argv[1]), int(sys.argv[2])
summary = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "exit_status": status}
try:
    summary["device"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True, text=True).stdout.strip()
except OSError:
    summary["device"] = "unknown (no nvidia-smi)"
git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
summary["kernels_git_tree"] = git("rev-parse", "HEAD:kernels") + ("+dirty" if git("status", "--porcelain", "kernels") else "")
summary["commit"] = git("rev-parse", "HEAD")
if (out / "tests.xml").exists():
    s = ET.parse(out / "tests.xml").getroot()
    s = s if s.tag == "testsuite" else s[0]
    summary["tests"] = {k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
for tool in ("memcheck", "racecheck"):
    log = out / f"sanitizer-{tool}.log"
    if log.exists():
        m = re.findall(r"ERROR SUMMARY: (\d+) error", log.read_text())
        summary[f"sanitizer_{tool}_errors"] = sum(map(int, m)) if m else None
if (out / "gpu_step.json").exists():
    summary["benchmark"] = json.loads((out / "gpu_step.json").read_text())
(out / "summary.json").write_text(json.dumps(summary, indent=2))
lines = [f"gpubp gpu_check  {summary['date']}", f"device: {summary['device']}",
         f"commit {summary['commit']}  kernels/ tree {summary['kernels_git_tree']}",
         f"tests: {summary.get('tests')}",
         f"sanitizer errors: memcheck {summary.get('sanitizer_memcheck_errors')}, "
         f"racecheck {summary.get('sanitizer_racecheck_errors')}", ""]
if (out / "gpu_step.txt").exists():
    lines.append((out / "gpu_step.txt").read_text())
(out / "summary.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "gpu_check: results in $OUT (exit $status)"
exit $status
