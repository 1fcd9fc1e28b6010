#!/usr/bin/env bash
# mypy --strict over the whole installed package as `svcproxy` sees it: core/ is
# `svcproxy`, plugins/ `svcproxy.plugins`, demo/ `svcproxy.demo` (pyproject's
# package-dir mapping). mypy cannot follow the editable install's import hook,
# so it checks a tree of symlinks laid out like the installed package.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=.cache/typecheck
rm -rf "$tree"
mkdir -p "$tree/svcproxy"
for f in core/*; do ln -s "$PWD/$f" "$tree/svcproxy/"; done
ln -s "$PWD/plugins" "$tree/svcproxy/plugins"
ln -s "$PWD/demo" "$tree/svcproxy/demo"
MYPYPATH="$tree" exec "${VENV:-.venv}/bin/mypy" -p svcproxy
