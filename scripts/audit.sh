#!/usr/bin/env bash
# Audit the installed (pinned) dependencies with pip-audit. Run by scripts/test.sh after setup.
#
# The set audited is what `pip freeze` reports for .venv: the exact versions requirements*.txt
# resolved to. A finding fails (exit 1) unless its ID is in .ci/audit-allowlist.txt with a reason.
# When pip-audit cannot reach a vulnerability service (an offline or registry-only machine), it
# prints one clear SKIPPED line and exits 0, so CI does not fail for want of a network.
# SYNTHBRAIN_SKIP_AUDIT=1 skips it on purpose.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${SYNTHBRAIN_SKIP_AUDIT:-0}" = 1 ]; then echo "pip-audit: SKIPPED (SYNTHBRAIN_SKIP_AUDIT=1)"; exit 0; fi
PIP_AUDIT=${PIP_AUDIT:-.venv/bin/pip-audit}
if [ ! -x "$PIP_AUDIT" ]; then echo "pip-audit: SKIPPED (not installed; run scripts/setup.sh dev)"; exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python -m pip freeze --exclude-editable > "$work/pinned.txt"
allow=${SYNTHBRAIN_AUDIT_ALLOWLIST:-.ci/audit-allowlist.txt}
ignores=()
if [ -f "$allow" ]; then
  while read -r id reason; do
    [ -z "$id" ] && continue
    case "$id" in \#*) continue ;; esac
    if [ -z "$reason" ]; then echo "pip-audit: $allow lists $id without a reason" >&2; exit 1; fi
    ignores+=(--ignore-vuln "$id")
  done < "$allow"
fi
"$PIP_AUDIT" -r "$work/pinned.txt" --no-deps --disable-pip --progress-spinner off -f json -o "$work/audit.json" \
  "${ignores[@]}" > "$work/out.txt" 2> "$work/err.txt"
rc=$?
.venv/bin/python - "$work" "$rc" <<'PY'
import json, re, sys
from pathlib import Path

work, rc = Path(sys.argv[1]), int(sys.argv[2])
err = (work / "err.txt").read_text(errors="replace")
try:
    deps = json.loads((work / "audit.json").read_text())["dependencies"]
except (OSError, ValueError, KeyError):
    deps = None
if deps is None:
    if re.search(r"ConnectionError|Name or service not known|Max retries|timed out|Temporary failure", err):
        print("pip-audit: SKIPPED - no vulnerability service reachable from this machine (network); dependencies NOT audited")
        sys.exit(0)
    print("pip-audit: failed to run:\n" + err[-2000:], file=sys.stderr)
    sys.exit(1)
audited = [d for d in deps if "skip_reason" not in d]
if not audited:
    print(f"pip-audit: SKIPPED - the vulnerability service knew none of the {len(deps)} pinned packages "
          "(registry-only network or mirror); dependencies NOT audited")
    sys.exit(0)
found = [(d["name"], d["version"], v["id"], ",".join(v.get("fix_versions", [])) or "no fix")
         for d in audited for v in d.get("vulns", [])]
for name, version, vid, fix in found:
    print(f"pip-audit: {name} {version}: {vid} (fixed in {fix})")
skipped = len(deps) - len(audited)
print(f"pip-audit: {len(audited)} packages audited ({skipped} could not be), {len(found)} known vulnerabilities"
      + (" not in the allow-list" if found else ""))
sys.exit(1 if found or rc not in (0, 1) else 0)
PY
