#!/usr/bin/env bash
# Build static musl binaries of outpost for every supported target without Docker,
# installing what the routes need (rustup targets, nightly rust-src, zig via pip,
# cargo-zigbuild), then report each binary's size and linkage.
#
#   cross/build-all.sh                 # all six targets
#   cross/build-all.sh mips mipsel     # some of them (short or full names)
#   cross/build-all.sh --tools-only    # install what the routes need, build nothing
#   KEEP_SYMBOLS=1 cross/build-all.sh  # link unstripped, keep <bin>.syms for
#                                      # cross/size-breakdown.sh, strip with binutils
#
# Routes (see cross/README.md for why):
#   x86_64                   stable, prebuilt std, cargo-zigbuild as linker and C compiler
#   aarch64, armv7, armv6,   nightly -Zbuild-std (no prebuilt musl std, or for size),
#   mipsel, mips             cargo-zigbuild, -Cpanic=immediate-abort; armv7 also Thumb-2
#
# Outputs: target/dist/<triple>/outpost, target/dist/sizes.tsv.
# Builds run one target at a time under `nice -n 19`: the machine is shared.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
cd "$root"
# shellcheck source=cross/targets.sh
source "$here/targets.sh"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

keep_symbols=${KEEP_SYMBOLS:-0}
tools_only=0
selected=()
for a in "$@"; do
    case $a in
    --tools-only) tools_only=1 ;;
    *) selected+=("$(resolve_target "$a")") ;;
    esac
done
((${#selected[@]})) || selected=("${ALL_TARGETS[@]}")

# --- tools ---------------------------------------------------------------------------

need_nightly=0
need_stable_targets=()
for t in "${selected[@]}"; do
    if [[ $(route_of "$t") == nightly ]]; then need_nightly=1; else need_stable_targets+=("$t"); fi
done

command -v file >/dev/null || { say "installing file"; apt-get install -y file >/dev/null; }
if ((keep_symbols)) && ! strip --help 2>/dev/null | grep -q elf32-tradbigmips; then
    say "installing binutils-multiarch (strip and nm for every target)"
    apt-get install -y binutils-multiarch >/dev/null
fi

if ((${#need_stable_targets[@]})); then
    installed=$(rustup target list --installed --toolchain "$STABLE")
    for t in "${need_stable_targets[@]}"; do
        grep -qx "$t" <<<"$installed" || { say "rustup target add $t"; rustup target add --toolchain "$STABLE" "$t"; }
    done
fi
if ((need_nightly)); then
    rustup toolchain list | grep -q "^$NIGHTLY" || { say "installing $NIGHTLY"; rustup toolchain install "$NIGHTLY" --profile minimal; }
    rustup component list --installed --toolchain "$NIGHTLY" | grep -q '^rust-src' ||
        { say "rustup component add rust-src ($NIGHTLY)"; rustup component add rust-src --toolchain "$NIGHTLY"; }
fi

if ! python3 -m ziglang version >/dev/null 2>&1 && ! command -v zig >/dev/null; then
    say "installing zig (pip install ziglang)"
    python3 -m pip install --quiet ziglang ||
        python3 -m pip install --quiet --break-system-packages ziglang
fi
if ! command -v cargo-zigbuild >/dev/null; then
    say "installing cargo-zigbuild"
    nice -n 19 cargo "+$STABLE" install --locked cargo-zigbuild
fi

((tools_only)) && exit 0

# --- builds --------------------------------------------------------------------------

dist="$root/target/dist"
mkdir -p "$dist"
results=()

for t in "${selected[@]}"; do
    route=$(route_of "$t")
    flags=$(rustflags_of "$t")
    upper=$(tr 'a-z-' 'A-Z_' <<<"$t")
    what=(--bin outpost)

    if [[ $route == nightly ]]; then
        toolchain=$NIGHTLY
        extra=(-Zbuild-std=std,panic_abort)
        export CARGO_TARGET_DIR="$root/target/cross-nightly"
    else
        toolchain=$STABLE
        extra=()
        export CARGO_TARGET_DIR="$root/target/cross-stable"
    fi
    cflags_var="CFLAGS_${t//-/_}"
    say "building $t ($route${flags:+, RUSTFLAGS: $flags}${CFLAGS_OF[$t]:+, CFLAGS: ${CFLAGS_OF[$t]}})"
    start=$SECONDS
    strip_env=()
    ((keep_symbols)) && strip_env=(CARGO_PROFILE_RELEASE_STRIP=false)
    env "CARGO_TARGET_${upper}_RUSTFLAGS=$flags" "$cflags_var=${CFLAGS_OF[$t]:-}" "${strip_env[@]}" \
        nice -n 19 cargo "+$toolchain" zigbuild --release --locked --target "$t" \
        "${extra[@]}" "${what[@]}"
    secs=$((SECONDS - start))

    out="$dist/$t"
    mkdir -p "$out"
    rm -f "$out"/*
    cp "$CARGO_TARGET_DIR/$t/release/outpost" "$out/outpost"
    if ((keep_symbols)); then
        for bin in "$out"/*; do
            mv "$bin" "$bin.syms"
            strip --strip-all -o "$bin" "$bin.syms"
        done
    fi
    for bin in "$out"/*; do
        [[ $bin == *.syms ]] && continue
        desc=$(file -b "$bin")
        case $desc in
        *"statically linked"* | *"static-pie linked"*) ;;
        *) say "FAIL: $bin is not statically linked: $desc"; exit 1 ;;
        esac
    done
    size=$(stat -c %s "$out/outpost")
    results+=("$t	$route	$size	${secs}s	$(file -b "$out/outpost" | cut -d, -f1-2)")
done

# --- summary -------------------------------------------------------------------------

{
    printf 'target\troute\toutpost_bytes\tbuild_time\tfile\n'
    printf '%s\n' "${results[@]}"
} >"$dist/sizes.tsv.new"
# Keep rows of targets not rebuilt this time (if the old table has the same columns).
if [[ -f $dist/sizes.tsv && $(head -n 1 "$dist/sizes.tsv") == "$(head -n 1 "$dist/sizes.tsv.new")" ]]; then
    for t in "${ALL_TARGETS[@]}"; do
        grep -q "^$t	" "$dist/sizes.tsv.new" || grep "^$t	" "$dist/sizes.tsv" >>"$dist/sizes.tsv.new" || true
    done
fi
mv "$dist/sizes.tsv.new" "$dist/sizes.tsv"

echo
printf '%-34s %-8s %12s %8s  %s\n' target route outpost time file
for row in "${results[@]}"; do
    IFS=$'\t' read -r t route size secs desc <<<"$row"
    mb() { awk -v b="$1" 'BEGIN { printf "%.2f MB", b / 1e6 }'; }
    printf '%-34s %-8s %12s %8s  %s\n' "$t" "$route" "$(mb "$size")" "$secs" "$desc"
done
echo "binaries: $dist/<target>/   table: $dist/sizes.tsv"
