#!/usr/bin/env bash
# GPU machine, one call per stage: install the carried wheels, then
#   tests     the kernel tests (marked interpret/gpu) compiled on the GPU, per file [test paths]
#   validate  every example at real sizes against fp64 (scripts/gpu_validate.py)
#   bench     SSD forward vs mamba_ssm and FLA (scripts/bench_ssd.py), then `ssmc bench`
#   parallel  context parallelism over every GPU vs one (scripts/gpu_parallel.py)
#   mqar      the MQAR training example (examples/mqar.py SPEC... [flags])
#   backward  gradients vs fp64 at real sizes, fwd+bwd memory/time vs mamba_ssm (scripts/gpu_backward.py)
#   autotune  Mamba-2 2.7B / Mamba-1 shapes: planner vs best measured (scripts/gpu_autotune.py)
#   probe     the fused backward per launch knob at MQAR's shapes, fault-isolated (gpu_bwd_probe.py)
#   profile   per-kernel time of fwd+bwd vs mamba_ssm, chunked_bwd launch sweep (gpu_bwd_profile.py)
#   ncu       Nsight Compute sections of one fwd+bwd step's heavy kernels, ssmc and mamba_ssm
#   fwdncu    Nsight Compute sections of one forward of a spec and its peer (gpu_fwd_profile.py --ncu)
#   fwdprofile  per-kernel time of one spec's forward vs its peer (gpu_fwd_profile.py SPEC [args])
#   decode    one decode step vs mamba_ssm's selective_state_update, HBM floor, wall time (bench_decode.py)
#   compile   cold (empty caches) load + first fwd/bwd, and warm load, in fresh processes (compile_time.py)
#   all       the three in order
# Usage (device tool, carry .whl): bash scripts/gpu_check.sh STAGE [extra args]
# Output is printed and kept under $OUT (or ./out) for docs/gpu-runs.md.
set -uo pipefail
stage=${1:-all}
shift || true
out=${OUT:-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl >"$out/pip.log" 2>&1 || { cat "$out/pip.log"; exit 1; }
export PYTHONPATH="$PWD:/tmp/site"
export SSMC_CACHE_DIR=/tmp/ssmc-cache
mamba_src=$(ls -d .whl/mamba/mamba_ssm-*/ 2>/dev/null | head -n 1)
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
  date -u +%Y-%m-%dT%H:%MZ; } | tee "$out/env.txt"

status=0
if [[ $stage == tests || $stage == all ]]; then
    # the interpret- and gpu-marked tests compiled on the GPU, one pytest per file (the test
    # paths given, else every tests/test_*.py), each under its own timeout (TEST_TIMEOUT s,
    # default 300) with short tracebacks in pytest-<file>.log; other args go to pytest
    files=(); opts=()
    for a in "$@"; do if [[ $a == tests* ]]; then files+=("$a"); else opts+=("$a"); fi; done
    (( ${#files[@]} )) || files=(tests/test_*.py)
    for f in "${files[@]}"; do
        log="$out/pytest-$(echo "$f" | tr '/:[]' '____').log"
        timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -m "interpret or gpu" "$f" \
            -p no:cacheprovider --tb=short "${opts[@]}" >"$log" 2>&1
        rc=$?
        echo "$f rc=$rc: $(tail -n 1 "$log")" | tee -a "$out/pytest.log"
        (( rc == 0 || rc == 5 )) || status=1  # 5: nothing collected
    done
fi
if [[ $stage == validate || $stage == all ]]; then
    python3 scripts/gpu_validate.py --json "$out/validate.json" "$@" 2>&1 \
        | tee "$out/validate.log" || status=1
fi
if [[ $stage == bench || $stage == all ]]; then
    python3 scripts/bench_ssd.py --mamba-src "$mamba_src" --json "$out/bench_ssd.json" 2>&1 \
        | tee "$out/bench.log" || status=1
    # Every form and peer versus T, forward and forward+backward (docs/benchmarks.md);
    # plot the JSON elsewhere with `ssmc bench FILE.json --png FILE.png` if matplotlib is absent.
    png() { python3 -c 'import matplotlib' 2>/dev/null && echo --png "$out/$1.png"; }
    python3 -m ssmc bench examples/mamba2.ssm --backward --mamba-src "$mamba_src" --no-progress \
        --json "$out/bench_mamba2.json" $(png bench_mamba2) 2>&1 \
        | tee "$out/bench_mamba2.log" || status=1
    python3 -m ssmc bench examples/gla.ssm --backward --seqlen 2048 --batch 8 --dim H=16 \
        --dim N=128 --dim P=128 --no-progress --json "$out/bench_gla.json" $(png bench_gla) 2>&1 \
        | tee "$out/bench_gla.log" || status=1
fi
if [[ $stage == parallel ]]; then
    gpus=$(nvidia-smi -L | wc -l)
    python3 -m torch.distributed.run --nproc_per_node="$gpus" scripts/gpu_parallel.py \
        --json "$out/parallel.json" "$@" 2>&1 | tee "$out/parallel.log" || status=1
fi
if [[ $stage == autotune ]]; then
    python3 scripts/gpu_autotune.py --out "$out" "$@" 2>&1 | tee "$out/autotune.log" || status=1
fi
if [[ $stage == backward ]]; then
    python3 scripts/gpu_backward.py --mamba-src "$mamba_src" --json "$out/backward.json" "$@" 2>&1 \
        | tee "$out/backward.log" || status=1
fi
if [[ $stage == probe ]]; then
    python3 scripts/gpu_bwd_probe.py --json "$out/probe.json" "$@" 2>&1 | tee "$out/probe.log" \
        || status=1
fi
if [[ $stage == profile ]]; then
    python3 scripts/gpu_bwd_profile.py --mamba-src "$mamba_src" "$@" 2>&1 | grep -v -i warn \
        | tee "$out/profile.log" || status=1
fi
if [[ $stage == ncu || $stage == fwdncu ]]; then
    # NCU_KERNELS: a regex of kernel names (default: the backward's and forward's heavy ones;
    # for fwdncu, every kernel of the forwards)
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
    if [[ $stage == ncu ]]; then
        kernels=${NCU_KERNELS:-chunked_bwd|epilogue_bwd|chunked_scan_fwd|chunked_state_fwd|_chunk_scan|_chunk_state|_state_passing}
        script=(scripts/gpu_bwd_profile.py --ncu --mamba-src "$mamba_src")
    else
        kernels=${NCU_KERNELS:-.}
        script=(scripts/gpu_fwd_profile.py --ncu --mamba-src "$mamba_src")
    fi
    "$ncu" --clock-control none --profile-from-start off --kernel-name "regex:$kernels" \
        --section SpeedOfLight --section LaunchStats --section Occupancy \
        --section WarpStateStats --section ComputeWorkloadAnalysis \
        --section MemoryWorkloadAnalysis --print-summary none \
        python3 "${script[@]}" "$@" >"$out/ncu.log" 2>&1 || status=1
    grep -E "^  [a-zA-Z_]+.*\(|Duration|Registers Per|Achieved Occupancy|Compute \(SM\) Thr|Memory Thr|Stall|Local Memory|Spill|L1/TEX Hit|L2 Hit|Executed Ipc A|Issue Slots Busy|Dynamic Shared|Static Shared|Theoretical Occ|Block Limit Reg|DRAM Throughput|Waves Per" \
        "$out/ncu.log" | head -n 400
fi
if [[ $stage == fwdprofile ]]; then
    python3 scripts/gpu_fwd_profile.py --mamba-src "$mamba_src" "$@" 2>&1 | grep -v -i warn \
        | tee "$out/fwdprofile.log" || status=1
fi
if [[ $stage == decode ]]; then
    python3 scripts/bench_decode.py --mamba-src "$mamba_src" --json "$out/decode.json" "$@" 2>&1 \
        | tee "$out/decode.log" || status=1
fi
if [[ $stage == compile ]]; then
    python3 scripts/compile_time.py "$@" --json "$out/compile.json" 2>&1 | tee "$out/compile.log" \
        || status=1
fi
if [[ $stage == mqar ]]; then
    python3 examples/mqar.py "$@" --json "$out/mqar.json" 2>&1 | tee "$out/mqar.log" || status=1
fi
exit $status
