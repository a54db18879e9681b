#!/usr/bin/env bash
# The prepared GPU check (scripts/device_check.py at full size): SD-1.5 and SD3.5-Medium sized random models,
# 512 x 512, LoRA and full finetuning, gradient checkpointing on and off; writes "${OUT:-device_check}/device_check.json"
# and prints its path. Extra arguments go to the script (e.g. --cases 'sd35m-*' --max-seconds 300).
#
# Python: $PYTHON, else .venv/bin/python of this checkout, else python3. The checkout is put on PYTHONPATH (no
# install needed). When that Python lacks diffusers and the checkout holds wheels in .whl/ (the device machine's
# image has no diffusers), they are installed into /tmp/rewardtune-site first.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${OUT:-device_check}"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
if ! "$python" -c "import diffusers" 2>/dev/null && compgen -G "$root/.whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/rewardtune-site "$root"/.whl/*.whl
    export PYTHONPATH="/tmp/rewardtune-site:$PYTHONPATH"
fi

rc=0
"$python" "$root/scripts/device_check.py" --size full --out "$out" "$@" || rc=$?
echo "$out/device_check.json"
exit "$rc"
