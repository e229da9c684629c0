#!/usr/bin/env bash
# Check systemd/mmd.service with `systemd-analyze verify`.
# ExecStart is pointed at an existing binary in a temporary copy, since mmd need not be installed
# where the unit expects it. Exits 0 when the unit is clean. Without systemd-analyze it skips
# (exit 0), unless MMD_REQUIRE_SYSTEMD_ANALYZE is set, which turns the skip into a failure.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
unit="$repo/systemd/mmd.service"

if ! command -v systemd-analyze >/dev/null 2>&1; then
    if [[ -n "${MMD_REQUIRE_SYSTEMD_ANALYZE:-}" ]]; then
        echo "systemd-analyze not found and MMD_REQUIRE_SYSTEMD_ANALYZE is set" >&2
        exit 1
    fi
    echo "skip: systemd-analyze not found"
    exit 0
fi

stand_in=$(type -P true)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed -E "s#^ExecStart=[^ ]+#ExecStart=$stand_in#" "$unit" >"$tmp/mmd.service"
if ! grep -q "^ExecStart=$stand_in" "$tmp/mmd.service"; then
    echo "no ExecStart= line to rewrite in $unit" >&2
    exit 1
fi

# Keys newer than the installed systemd are reported as unknown (and ignored by it);
# tolerate exactly those the unit documents as optional.
version=$(systemd-analyze --version | awk 'NR == 1 {print $2}')
version=${version%%[!0-9]*}
tolerated='^$'
if ((version < 254)); then
    tolerated="Unknown key '(RestartSteps|RestartMaxDelaySec)'"
fi

status=0
output=$(systemd-analyze verify "$tmp/mmd.service" 2>&1) || status=$?
# Lines about other units on the host are not this unit's problem.
problems=$(printf '%s\n' "$output" | grep -F 'mmd.service' | grep -Ev "$tolerated" || true)

if ((status != 0)) || [[ -n "$problems" ]]; then
    echo "systemd-analyze verify (systemd $version) failed with status $status:" >&2
    printf '%s\n' "$output" >&2
    exit 1
fi
echo "ok: systemd/mmd.service verified by systemd $version"
if [[ -n "$output" ]]; then
    printf '%s\n' "$output"
fi
