#!/usr/bin/env bash
# Check the procd init script's UCI-to-flags mapping without OpenWrt: stub the few
# functions it uses from /lib/functions.sh and procd.sh, load a UCI file, run
# start_service and compare the agent command line it builds.
#
#   openwrt/test-init.sh
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# run_case NAME EXPECTED_COMMAND UCI_TEXT
run_case() {
    printf '%s\n' "$3" >"$tmp/outpost"
    local got
    got=$(UCI_FILE="$tmp/outpost" HOST=testhost sh -c '
        set -e
        . "$1"
        . "$2"
        # The init script reads the hostname from /proc; pin it.
        cat() { echo testhost; }
        start_service
    ' sh "$here/test-stubs.sh" "$here/files/outpost.init")
    if [[ $got == "$2" ]]; then
        printf '%-28s pass\n' "$1"
    else
        printf '%-28s FAIL\n    want: %s\n    got:  %s\n' "$1" "$2" "$got"
        return 1
    fi
}

status=0
run_case "disabled by default" "" "$(<"$here/files/outpost.config")" || status=1
run_case "every option" \
    "/usr/bin/outpost agent --name gw1 --state-dir /srv/o --broker mqtts://b:8883 --prefix op --keepalive 300s --backoff-cap 30m --durability normal --quota 8MiB --log-level debug" \
    "config agent 'main'
	option enabled '1'
	option name 'gw1'
	option broker 'mqtts://b:8883'
	option state_dir '/srv/o'
	option prefix 'op'
	option keepalive '300s'
	option backoff_cap '30m'
	option durability 'normal'
	option quota '8MiB'
	option log_level 'debug'" || status=1
run_case "defaults and config file" \
    "/usr/bin/outpost agent --config /etc/outpost/outpost.toml --name testhost --state-dir /etc/outpost/state --broker mqtt://10.0.0.1:1883" \
    "config agent 'main'
	option enabled '1'
	option broker 'mqtt://10.0.0.1:1883'
	option config '/etc/outpost/outpost.toml'" || status=1
exit $status
