# Sourced by the scripts: make .venv with Python 3.11+ and install the project
# into it, again only when a pyproject changed (so every script is idempotent).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

if [ ! -x .venv/bin/python ]; then
    python=""
    for candidate in python3 python3.11 python3.12 python3.13; do
        if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11, 4))' 2>/dev/null; then
            python="$candidate"
            break
        fi
    done
    if [ -z "$python" ]; then
        echo "aimesh needs Python 3.11.4 or newer on PATH" >&2
        exit 1
    fi
    "$python" -m venv .venv
fi

stamp=.venv/.aimesh-installed
wanted=$(cat pyproject.toml protos/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ./protos -e '.[dev]'
    echo "$wanted" > "$stamp"
fi
