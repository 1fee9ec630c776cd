#!/usr/bin/env bash
# Run the library's unit tests (`cargo test --lib`), the core simulation
# (`cargo test --test it -- sim::`: real stores, simulated faults, no broker) and
# the link against a native mosquitto (`link::`), cross-compiled, under qemu-user:
# one ARM target and big-endian mips by default.
#
#   cross/test-qemu.sh                    # aarch64 and mips
#   cross/test-qemu.sh armv7 mipsel       # others
#   cross/test-qemu.sh mips -- frame::    # arguments after -- go to the unit tests
#   OUTPOST_SIM_SEEDS=200 cross/test-qemu.sh   # fewer simulation seeds (default 1,000)
#
# Runners (qemu-*-static with the right -cpu) come from .cargo/config.toml; binfmt_misc
# is not needed. Per-target flags are the config's plus the mips time cfg
# (test_rustflags_of in cross/targets.sh). Build-std targets compile std for
# the test profile too, so the first run per target takes a few minutes.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
cd "$root"
# shellcheck source=cross/targets.sh
source "$here/targets.sh"
say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

selected=()
while (($#)) && [[ $1 != -- ]]; do selected+=("$(resolve_target "$1")"); shift; done
(($#)) && shift
((${#selected[@]})) || selected=(aarch64-unknown-linux-musl mips-unknown-linux-musl)

command -v qemu-mips-static >/dev/null || { say "installing qemu-user-static"; apt-get install -y qemu-user-static >/dev/null; }
# Same tool setup as the release builds (targets, rust-src, zig, cargo-zigbuild).
"$here/build-all.sh" --tools-only "${selected[@]}"

# qemu-user 7.2 returns getsockopt(SO_ERROR) values in the host's errno numbering;
# the one test that reads a refused connect's message knows to expect that.
export OUTPOST_QEMU_SO_ERROR_UNTRANSLATED=1

rows=()
failed=0
for t in "${selected[@]}"; do
    if [[ $(route_of "$t") == nightly ]]; then
        toolchain=$NIGHTLY
        extra=(-Zbuild-std=std,panic_abort)
        export CARGO_TARGET_DIR="$root/target/cross-nightly"
    else
        toolchain=$STABLE
        extra=()
        export CARGO_TARGET_DIR="$root/target/cross-stable"
    fi
    say "cargo test --lib, --test it sim:: link:: --target $t (runner: $(qemu_of "$t"))"
    log="$root/target/dist/test-$t.log"
    mkdir -p "$(dirname "$log")"
    start=$SECONDS
    set +e
    # `cargo zigbuild` only builds; the test subcommand is cargo-zigbuild's own.
    upper=$(tr 'a-z-' 'A-Z_' <<<"$t")
    flags=$(test_rustflags_of "$t")
    say "RUSTFLAGS for $t: ${flags:-none}"
    env "CARGO_TARGET_${upper}_RUSTFLAGS=$flags" \
        RUSTUP_TOOLCHAIN=$toolchain nice -n 19 cargo-zigbuild test --locked --lib --target "$t" \
        "${extra[@]}" -- "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    # The simulation and the link's tests live in the integration binary; only
    # they run (the others need the native outpost binary). The link's tests start
    # the host's mosquitto, its clients and openssl, which run natively.
    env "CARGO_TARGET_${upper}_RUSTFLAGS=$flags" \
        RUSTUP_TOOLCHAIN=$toolchain nice -n 19 cargo-zigbuild test --locked --test it --target "$t" \
        "${extra[@]}" -- sim:: link:: 2>&1 | tee -a "$log"
    rc_sim=${PIPESTATUS[0]}
    ((rc == 0)) && rc=$rc_sim
    set -e
    summary=$(grep -E '^test result:' "$log" | sed 's/^test result: //; s/; finished in.*//' |
        paste -sd '|' | sed 's/|/  +  /')
    ((rc == 0)) || failed=1
    rows+=("$(printf '%-32s %-5s %6ss  %s' "$t" "$( ((rc == 0)) && echo pass || echo FAIL)" "$((SECONDS - start))" "${summary:-no test summary}")")
done

echo
printf '%-32s %-5s %7s  %s\n' target rc time result
printf '%s\n' "${rows[@]}"
exit $failed
