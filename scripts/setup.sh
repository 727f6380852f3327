#!/usr/bin/env bash
# Sets up everything on a fresh machine, and does nothing when nothing changed:
#   1. system packages (apt, when root; else says which): the libraries FFCV compiles
#      against, Chromium for the browser test of the MLflow UI (tests/test_browser.py) and
#      PostgreSQL for the team stack (`ran-cli stack up`, tests/test_team.py), and the
#      namespace tools the Ray cluster test runs in (util-linux's unshare/nsenter, ip, ps),
#   2. a virtual environment in .venv with Python 3.11,
#   3. the exact versions in requirements.lock, then this project (editable).
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM_PACKAGES=(pkg-config libturbojpeg0-dev libopencv-dev chromium postgresql util-linux iproute2 procps)
missing=()
for pkg in "${SYSTEM_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "setup: installing system packages (FFCV, browser test, team stack, cluster test): ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: FFCV, the browser test, the team stack and the cluster test need: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "setup: Python 3.11 is required (found $("$PYTHON" --version)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv

stamp=.venv/.setup-stamp
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi
echo "setup: installing requirements.lock into .venv (first time: several minutes)"
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q -r requirements.lock
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
echo "$want" >"$stamp"
