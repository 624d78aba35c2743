#!/usr/bin/env bash
# Creates (or reuses) a Python venv with Locust for locust_scripts/ and prints the path of
# its `locust` executable on the last line. Idempotent: a venv installed from the current
# locust_scripts/requirements.txt is left alone; concurrent calls wait for each other.
#
#   LOCUST_VENV   venv folder (default: target/locust-venv in the repository)
#   PYTHON        interpreter that creates the venv (default: python3, 3.10 or newer)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
requirements="$root/locust_scripts/requirements.txt"
venv=${LOCUST_VENV:-"$root/target/locust-venv"}
python=${PYTHON:-python3}

mkdir -p "$(dirname "$venv")"
venv=$(cd "$(dirname "$venv")" && pwd)/$(basename "$venv")
if command -v flock >/dev/null 2>&1; then
  exec 9>"$venv.lock"
  flock 9
fi

# Up to date: installed from these requirements, and the venv still points at itself (a
# moved folder's scripts name the old path).
stamp="$venv/.lps-requirements"
if [ -x "$venv/bin/locust" ] && [ -f "$stamp" ] && cmp -s "$requirements" "$stamp" \
  && [ "$(head -n 1 "$venv/bin/locust")" = "#!$venv/bin/python" ]; then
  echo "$venv/bin/locust"
  exit 0
fi

if ! command -v "$python" >/dev/null 2>&1; then
  echo "error: $python not found; install Python 3.10+ with its venv module (Debian: python3-venv)" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c '' 2>/dev/null; then
  echo "creating $venv" >&2
  "$python" -m venv --clear "$venv" >&2 || {
    echo "error: '$python -m venv' failed; install its venv module (Debian: python3-venv)" >&2
    exit 1
  }
fi
echo "installing $requirements into $venv" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2
"$venv/bin/locust" --version >&2
cp "$requirements" "$stamp"
echo "$venv/bin/locust"
