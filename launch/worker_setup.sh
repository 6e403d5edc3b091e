#!/usr/bin/env bash
# Runs on every TPU VM worker (from launch/tpu_vm.sh), inside the unpacked code directory: makes
# or reuses a Python >= 3.11 virtualenv and installs the pinned stack when the install stamp
# (Python version + hash of requirements.txt + the launcher's own pins) has changed.
#
#   bash launch/worker_setup.sh VENV_DIR [PIN ...]     e.g. ~/uae_jax_venv 'jax[tpu]==0.10.2'
#
# The TPU VM images (tpu-ubuntu2204-base, v2-alpha-tpuv5, v2-alpha-tpuv6e) are Ubuntu 22.04 with
# python3 = 3.10, which jax==0.10.2 does not support. Interpreter choice, first match wins:
#   1. $UAE_PYTHON (tpu_vm.sh --python), else python3.13 / python3.12 / python3.11 / python3 when
#      it is >= 3.11 and has the venv + ensurepip modules (Debian/Ubuntu: pythonX.Y-venv);
#   2. uv with a uv-managed CPython $UAE_PYTHON_VERSION (no root needed); uv itself comes from
#      PATH, ~/.local/bin, `python3 -m pip install --user uv==$UV_VERSION`, or uv's installer;
#   3. otherwise stop with exit code 3 and say how to provide one.
set -euo pipefail

MIN_MINOR=11
UV_VERSION="${UV_VERSION:-0.13.8}"
PY_VERSION="${UAE_PYTHON_VERSION:-3.11}"

[[ $# -ge 1 ]] || { echo "usage: worker_setup.sh VENV_DIR [PIN ...]" >&2; exit 2; }
VENV="$1"; shift
PINS=("$@")

# Succeeds when `$1 -V` reports Python 3.MIN_MINOR or newer.
py_new_enough() {
  local v
  v=$("$1" -V 2>&1) || return 1
  [[ "$v" =~ ^Python\ 3\.([0-9]+) ]] || return 1
  (( BASH_REMATCH[1] >= MIN_MINOR ))
}

# Succeeds when `$1` can create a virtualenv with pip (python3.X-venv installed).
py_has_venv() { "$1" -c 'import venv, ensurepip' >/dev/null 2>&1; }

# Prints the first suitable system interpreter, or nothing.
find_system_python() {
  local c
  for c in ${UAE_PYTHON:-} python3.13 python3.12 python3.11 python3; do
    if command -v "$c" >/dev/null 2>&1 && py_new_enough "$c" && py_has_venv "$c"; then
      echo "$c"; return 0
    fi
  done
  if [[ -n "${UAE_PYTHON:-}" ]]; then
    echo "error: --python $UAE_PYTHON on $(hostname) is not Python >= 3.$MIN_MINOR with venv" >&2
    exit 3
  fi
}

# Prints the path of a uv binary, installing uv for this user if needed; nothing if impossible.
find_uv() {
  if command -v uv >/dev/null 2>&1; then command -v uv; return 0; fi
  if [[ -x "$HOME/.local/bin/uv" ]]; then echo "$HOME/.local/bin/uv"; return 0; fi
  echo "installing uv==$UV_VERSION for $(id -un 2>/dev/null || echo this user)" >&2
  if command -v python3 >/dev/null 2>&1 &&
     python3 -m pip install -q --user "uv==$UV_VERSION" >&2 && [[ -x "$HOME/.local/bin/uv" ]]; then
    echo "$HOME/.local/bin/uv"; return 0
  fi
  if command -v curl >/dev/null 2>&1 &&
     curl -LsSf "https://astral.sh/uv/$UV_VERSION/install.sh" | sh >&2 &&
     [[ -x "$HOME/.local/bin/uv" ]]; then
    echo "$HOME/.local/bin/uv"; return 0
  fi
}

# One line saying which python3 this worker has, for the error message.
system_python_note() {
  if command -v python3 >/dev/null 2>&1; then
    echo "python3 here is $(python3 -V 2>&1)"
  else
    echo "there is no python3 here"
  fi
}

# Creates $VENV from a suitable interpreter (system first, then uv-managed), or exits 3.
make_venv() {
  local py uv
  py=$(find_system_python)
  if [[ -n "$py" ]]; then
    echo "creating $VENV with $py ($("$py" -V 2>&1))" >&2
    "$py" -m venv "$VENV"
    return
  fi
  uv=$(find_uv || true)
  if [[ -n "$uv" ]]; then
    echo "creating $VENV with a uv-managed Python $PY_VERSION" >&2
    "$uv" python install "$PY_VERSION" >&2
    "$uv" venv --seed --python "$PY_VERSION" "$VENV" >&2
    return
  fi
  echo "error: uae_jax needs Python >= 3.$MIN_MINOR (jax==0.10.2) but $(system_python_note)" \
       "on $(hostname) and uv could not be installed. Fix: 'sudo apt-get install -y" \
       "python3.11-venv' (Ubuntu 22.04 universe / deadsnakes PPA), or install uv" \
       "(https://docs.astral.sh/uv/), or pass --python /path/to/python3.11 to tpu_vm.sh." >&2
  exit 3
}

# A venv left by an older run with a too-old (or vanished) interpreter is rebuilt.
if [[ -e "$VENV" ]] && ! { [[ -x "$VENV/bin/python" ]] && py_new_enough "$VENV/bin/python"; }; then
  echo "removing $VENV: its interpreter is missing or older than 3.$MIN_MINOR" >&2
  rm -rf "$VENV"
fi
[[ -x "$VENV/bin/python" ]] || make_venv
if ! py_new_enough "$VENV/bin/python"; then
  echo "error: $VENV/bin/python is $("$VENV/bin/python" -V 2>&1), need >= 3.$MIN_MINOR" >&2
  exit 3
fi

# The stamp names everything the install depends on, so a changed pin reinstalls.
STAMP="$VENV/.tpu-installed"
WANT="$("$VENV/bin/python" -V 2>&1) requirements=$(sha256sum requirements.txt | cut -d' ' -f1) pins=${PINS[*]:-}"
if [[ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]]; then
  "$VENV/bin/python" -m pip install -q -U pip
  "$VENV/bin/python" -m pip install -q -r requirements.txt "${PINS[@]}"
  printf '%s\n' "$WANT" > "$STAMP"
  echo "installed: $WANT" >&2
else
  echo "environment up to date: $WANT" >&2
fi
