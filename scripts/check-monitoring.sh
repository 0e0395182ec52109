#!/usr/bin/env bash
# Checks examples/flash_sale/ops/: the Prometheus rules with `promtool check rules`, and their
# unit tests with `promtool test rules` (installs Debian's `prometheus` package for it when
# missing, as scripts/test.sh does redis-server; skips both, saying so, when it cannot),
# the Grafana dashboard as JSON, and that every metric either queries is one the crate
# records (README's metrics table).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=examples/flash_sale/ops
rules=$dir/prometheus-rules.yml
dashboard=$dir/grafana-dashboard.json

if ! command -v promtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  as_root=()
  [ "$(id -u)" = 0 ] || { command -v sudo >/dev/null 2>&1 && as_root=(sudo); }
  if [ "$(id -u)" = 0 ] || [ ${#as_root[@]} -gt 0 ]; then
    echo "promtool is missing: installing Debian's prometheus package with apt-get" >&2
    "${as_root[@]}" apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq --no-install-recommends prometheus >/dev/null || true
  fi
fi
if command -v promtool >/dev/null 2>&1; then
  promtool check rules "$rules"
  (cd "$dir" && promtool test rules prometheus-rules.test.yml)
else
  echo "skipped: promtool check rules and test rules (no promtool, and the prometheus package could not be installed: apt-get install prometheus)" >&2
fi

python3 -m json.tool "$dashboard" >/dev/null
python3 - "$rules" "$dashboard" <<'PY'
import json, re, sys
rules, dashboard = sys.argv[1], sys.argv[2]
known = set(re.findall(r"^\| `(lock_[a-z_]+)` \|", open("README.md").read(), re.M))
if not known:
    sys.exit("no metrics table found in README.md")
exprs = []
def walk(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query", "definition") and isinstance(value, str):
                exprs.append(value)
            walk(value)
    elif isinstance(node, list):
        for value in node:
            walk(value)
walk(json.load(open(dashboard)))
exprs += re.findall(r"^\s*expr:\s*(.*(?:\n\s{12,}.*)*)", open(rules).read(), re.M)
used = set()
for expr in exprs:
    for name in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if name.startswith("lock_") and ":" not in name:
            used.add(re.sub(r"_(bucket|sum|count)$", "", name) if name.endswith(("_bucket", "_sum", "_count")) else name)
unknown = sorted(used - known)
if unknown:
    sys.exit(f"the monitoring examples query metrics the crate does not record: {unknown}")
print(f"monitoring: {len(used)} metrics queried, all in README's metrics table", file=sys.stderr)
PY
