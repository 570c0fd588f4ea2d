#!/usr/bin/env bash
# The wheels the device machine lacks, downloaded here into .whl/ for the device tool's carry=[".whl"] (the device
# machine has no network; .whl/ is git-ignored, so a new checkout starts without it and scripts/device_check.sh
# would find no CUTLASS headers). The kernel build needs the first two; WITH_HUMMING=1 adds the peer and what it
# imports (the bench steps' humming columns).
#   bash scripts/fetch_device_wheels.sh            # nvidia-cutlass, nvidia-cuda-cccl
#   WITH_HUMMING=1 bash scripts/fetch_device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=(nvidia-cutlass==4.2.0.0 nvidia-cuda-cccl==13.0.85)
[ -n "${WITH_HUMMING:-}" ] && wheels+=(humming-kernels==0.1.19 packaging)
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "${wheels[@]}"
ls -1 .whl
