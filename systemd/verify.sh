#!/usr/bin/env bash
# Check the unit (and the unit with the root drop-in) with `systemd-analyze verify`.
# verify insists that ExecStart's program exists, so a copy of the unit points at a
# stand-in: the built binary if there is one, else /bin/true.
#
#   systemd/verify.sh [path/to/outpost]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=${1:-$here/../target/dist/x86_64-unknown-linux-musl/outpost}
[[ -x $bin ]] || bin=/bin/true
bin=$(realpath "$bin")

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/base" "$tmp/root/outpost.service.d"
for d in base root; do
    sed "s|^ExecStart=/usr/bin/outpost|ExecStart=$bin|" "$here/outpost.service" >"$tmp/$d/outpost.service"
done
cp "$here/outpost-root.conf" "$tmp/root/outpost.service.d/root.conf"

status=0
rows=()
for d in base root; do
    echo "==> systemd-analyze verify outpost.service ($d; ExecStart=$bin)"
    if out=$(SYSTEMD_UNIT_PATH="$tmp/$d:" systemd-analyze verify "$tmp/$d/outpost.service" 2>&1); then
        verdict=pass
    else
        verdict=FAIL
        status=1
    fi
    # verify exits 0 on unknown keys and bad values, so any complaint about our
    # unit fails the check; complaints about other units on this machine are not ours.
    if grep -i 'outpost' <<<"$out"; then
        verdict=FAIL
        status=1
    fi
    exposure=$(SYSTEMD_UNIT_PATH="$tmp/$d:" systemd-analyze security --offline=true \
        "$tmp/$d/outpost.service" 2>/dev/null | tail -n 1 | sed 's/.*: //')
    rows+=("$(printf '%-28s %-6s %s' "$d" "$verdict" "$exposure")")
done
printf '\n%-28s %-6s %s\n' "unit" verify "exposure (systemd-analyze security)"
printf '%s\n' "${rows[@]}"
exit $status
