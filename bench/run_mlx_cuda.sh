#!/bin/bash
# MLX on CUDA vs our torch path (bench/bench_mlx_cuda.py) in two device calls: the mlx-cuda-13 wheel (90 MB) is
# larger than one call may carry (64 MiB), so it travels split in two, git-ignored, under .mlxw/ (see the end).
#
#   stage1   carry [".mlxw/part1"]: copies the first half of the wheel to /tmp/mlxw_parts/ and exits.
#   stage2   carry [".mlxw/part2"]: copies the second half and the mlx wheel there, rebuilds the wheel, checks its
#            sha256, installs both into /tmp/mlxsite, checks that MLX runs on the GPU, then runs
#            `bench/bench_mlx_cuda.py --out $OUT` (extra arguments go to the bench) -> $OUT/mlx_cuda.json, log.txt.
# Call stage2 while the machine from stage1 is still warm: /tmp does not survive a fresh machine.
#
# How MLX finds CUDA here: mlx-cuda-13 declares the nvidia-* CUDA 13 pip packages as dependencies and finds them
# beside itself (libmlx.so RPATH $ORIGIN/../../nvidia/{cu13,cublas,cudnn,...}/lib; NVRTC's CUDA runtime headers
# under <site>/nvidia/cu13/include). We install with --no-deps into /tmp/mlxsite, so /tmp/mlxsite/nvidia is linked
# to the nvidia/ folder of the torch venv (torch 2.11+cu130 ships the same packages); LD_LIBRARY_PATH and CUDA_HOME
# are set as fallbacks.
set -u
export PYTHONUNBUFFERED=1
PARTS=/tmp/mlxw_parts
SITE_DIR=/tmp/mlxsite
WHEEL=mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
MLX_WHEEL=mlx-0.32.4-cp312-cp312-manylinux_2_35_x86_64.whl
PY=${PY:-python3}
OUT=${OUT:-bench_out}

die() { echo "run_mlx_cuda: $*" >&2; exit 1; }

copy_part() {  # $1 = .mlxw/part1 | .mlxw/part2
    [ -d "$1" ] || die "$1 is missing: carry it with this call (carry: [\"$1\"])"
    mkdir -p "$PARTS"
    cp -f "$1"/* "$PARTS"/ || die "copy of $1 failed"
    ls -l "$PARTS"
    df -h /tmp | tail -1
}

stage1() {
    copy_part .mlxw/part1
    (cd "$PARTS" && sha256sum -c SHA256SUMS.part1) || die "part 1 is corrupt"
    echo "stage1 done: now run stage2 (carry [\".mlxw/part2\"]) on this machine"
}

assemble() {
    copy_part .mlxw/part2
    if [ ! -f "$PARTS/$WHEEL.part-aa" ] && [ -f .mlxw/part1/$WHEEL.part-aa ]; then
        cp -f .mlxw/part1/* "$PARTS"/  # an ignored folder kept in the checkout since stage1
    fi
    [ -f "$PARTS/$WHEEL.part-aa" ] || die "part 1 is not on this machine (a fresh machine since stage1?): run stage1 again"
    (cd "$PARTS" && sha256sum -c SHA256SUMS.part1 SHA256SUMS.parts) || die "a part is corrupt"
    cat "$PARTS/$WHEEL".part-* > "$PARTS/$WHEEL" || die "cat failed"
    (cd "$PARTS" && sha256sum -c SHA256SUMS) || die "the reassembled wheels do not match SHA256SUMS"
}

install_wheels() {
    rm -rf "$SITE_DIR"  # pip --target will not merge into an existing mlx/ folder
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE_DIR" \
            "$PARTS/$MLX_WHEEL" "$PARTS/$WHEEL"; then
        echo "pip install failed; unpacking the wheels directly (a wheel is a zip of site-packages)"
        rm -rf "$SITE_DIR"
        "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
            "$SITE_DIR" "$PARTS/$MLX_WHEEL" "$PARTS/$WHEEL" || die "unpacking failed"
        chmod -R u+rwX "$SITE_DIR"
    fi
    ls "$SITE_DIR"/mlx/core*.so "$SITE_DIR"/mlx/lib/libmlx.so || die "mlx is incomplete in $SITE_DIR"
}

cuda_env() {
    local torch_site nv libs d hdr
    torch_site=$("$PY" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))") ||
        die "torch does not import with $PY"
    nv=${NVIDIA_DIR:-$torch_site/nvidia}  # NVIDIA_DIR: another folder of nvidia-* pip packages
    if [ ! -d "$nv" ]; then
        for d in /opt/torch/.venv/lib/python3*/site-packages/nvidia; do [ -d "$d" ] && nv="$d"; done
    fi
    [ -d "$nv" ] || die "no nvidia/ pip packages beside torch ($torch_site): set NVIDIA_DIR"
    echo "nvidia packages: $nv"; ls "$nv"
    [ -e "$SITE_DIR/nvidia" ] || ln -s "$nv" "$SITE_DIR/nvidia"
    libs=""
    for d in "$nv"/*/lib; do [ -d "$d" ] && libs="$libs${libs:+:}$d"; done
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    hdr=""
    for d in "$nv/cu13/include" "$nv/cuda_runtime/include" /usr/local/cuda/include /usr/local/cuda-13*/include \
             /usr/include; do
        [ -f "$d/cuda_runtime.h" ] && hdr="$d" && break
    done
    [ -n "$hdr" ] || hdr=$(dirname "$(find "$nv" /usr/local -name cuda_runtime.h 2>/dev/null | head -1)" 2>/dev/null)
    if [ -n "$hdr" ] && [ -f "$hdr/cuda_runtime.h" ]; then
        export CUDA_HOME="${hdr%/include}"  # MLX's NVRTC looks in $CUDA_HOME/include when its own path fails
        echo "CUDA runtime headers: $hdr (CUDA_HOME=$CUDA_HOME)"
    else
        echo "WARNING: no cuda_runtime.h found: MLX cannot JIT its kernels (install nvidia-cuda-runtime headers)"
    fi
    export PYTHONPATH="$SITE_DIR${PYTHONPATH:+:$PYTHONPATH}"
}

preflight() {
    "$PY" - <<'EOF'
import math
import mlx.core as mx
import numpy as np

print("mlx", mx.__version__, mx.__file__)
print("default device:", mx.default_device(), "| cuda available:", mx.cuda.is_available())
a = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
m = mx.array(a)
mm = np.array(m @ m)
print("matmul rel err vs numpy (f32, TF32 on CUDA):", float(np.linalg.norm(mm - a @ a) / np.linalg.norm(a @ a)))
f = mx.compile(lambda x: mx.exp(x.astype(mx.bfloat16)) * 2 + 1)  # JIT (NVRTC) of a fused elementwise kernel
print("compiled elementwise finite:", bool(np.isfinite(np.array(f(m).astype(mx.float32))).all()))
q = mx.random.normal((1, 4, 64, 128)).astype(mx.bfloat16)
o = mx.fast.scaled_dot_product_attention(q, q, q, scale=1 / math.sqrt(128))
mx.eval(o)
print("sdpa ok:", o.shape, o.dtype)
EOF
}

stage2() {
    assemble
    install_wheels
    cuda_env
    mkdir -p "$OUT"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/smi.txt"
    if ! preflight; then
        echo "PREFLIGHT FAILED: libmlx.so dependencies:"
        ldd "$SITE_DIR/mlx/lib/libmlx.so" | grep -E "not found|cu|nccl|nvrtc" || true
        echo "(the bench still runs: torch numbers and MLX errors land in mlx_cuda.json)"
    fi
    set -o pipefail
    "$PY" bench/bench_mlx_cuda.py --out "$OUT" "$@" 2>&1 | grep --line-buffered -v -E "UserWarning|warnings.warn" |
        tee "$OUT/log.txt"
}

# Preparing .mlxw/ (on the workstation, once; .mlxw/ is in .git/info/exclude):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_35_x86_64 -d /tmp/mlxw mlx==0.32.4 mlx-cuda-13==0.32.4
#   split -b 45000000 $WHEEL $WHEEL.part-          -> part-aa to .mlxw/part1/, part-ab + the mlx wheel to .mlxw/part2/
#   sha256sum $WHEEL $MLX_WHEEL > .mlxw/part2/SHA256SUMS; part hashes in part1/SHA256SUMS.part1, part2/SHA256SUMS.parts
cmd=${1:-}
shift || true
case "$cmd" in
    stage1) stage1 ;;
    stage2) stage2 "$@" ;;
    *) die "usage: bash bench/run_mlx_cuda.sh stage1 | stage2 [bench_mlx_cuda.py arguments]" ;;
esac
