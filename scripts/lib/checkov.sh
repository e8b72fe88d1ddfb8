# Sourced by scripts/checkov: checkov in its own venv under .aimesh/ (its
# dependency pins clash with the project's, so it is not a project dependency).
# Pinned: a new release brings new checks, taken on purpose by raising this.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

CHECKOV_VERSION=3.3.30
checkov_venv=.aimesh/checkov-venv
if [ "$(cat "$checkov_venv/.installed" 2>/dev/null)" != "$CHECKOV_VERSION" ]; then
    rm -rf "$checkov_venv"
    python3 -m venv "$checkov_venv"
    "$checkov_venv/bin/python" -m pip install --quiet "checkov==$CHECKOV_VERSION"
    echo "$CHECKOV_VERSION" > "$checkov_venv/.installed"
fi
