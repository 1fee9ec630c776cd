#!/usr/bin/env bash
# What each compression codec adds to the release binary on one target (README,
# "Compression"): builds a commit as it is, then once per candidate a copy of it
# with that codec's compress and decompress linked into `main` (a call the
# optimiser cannot drop), and prints each size and its difference.
#
#   cross/codec-sizes.sh                     # mipsel-unknown-linux-musl, HEAD
#   cross/codec-sizes.sh armv7               # another target (short names as build-all.sh)
#   REV=de73f43 cross/codec-sizes.sh         # another commit (README: the one before
#                                            # compression, de73f43)
#   CODECS="none lz4" cross/codec-sizes.sh   # some candidates only ("none": the commit)
#
# Needs the tools cross/build-all.sh installs (`cross/build-all.sh --tools-only`).
# Copies live in $CARGO_TARGET_DIR/codec-sizes (default target/codec-sizes); one
# target directory is shared by all the builds, so only outpost and the codec are
# rebuilt after the first. Each build is `nice -n 19`: the machine is shared.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=cross/targets.sh
source "$here/targets.sh"

target=$(resolve_target "${1:-mipsel}")
codecs=${CODECS:-"none deflate1 deflate6 lz4 zstd zstd-dict"}
rev=${REV:-HEAD}
work=${CARGO_TARGET_DIR:-$root/target}/codec-sizes
export CARGO_TARGET_DIR=$work/target
mkdir -p "$work"

# The Cargo.toml line and the Rust expression (of `data: &[u8]`, giving a usize)
# that pull one codec in, both ways.
dep_of() {
    case $1 in
    deflate*) echo 'miniz_oxide = { version = "0.8", default-features = false, features = ["with-alloc"] }' ;;
    lz4) echo 'lz4_flex = { version = "0.11", default-features = false, features = ["safe-encode", "safe-decode"] }' ;;
    zstd*) echo 'zstd = { version = "0.13", default-features = false }' ;;
    esac
}
use_of() {
    case $1 in
    deflate1) echo 'miniz_oxide::inflate::decompress_to_vec_with_limit(&miniz_oxide::deflate::compress_to_vec(data, 1), 1 << 20).map_or(0, |v| v.len())' ;;
    deflate6) echo 'miniz_oxide::inflate::decompress_to_vec_with_limit(&miniz_oxide::deflate::compress_to_vec(data, 6), 1 << 20).map_or(0, |v| v.len())' ;;
    lz4) echo 'lz4_flex::block::decompress_size_prepended(&lz4_flex::block::compress_prepend_size(data)).map_or(0, |v| v.len())' ;;
    zstd) echo 'zstd::bulk::decompress(&zstd::bulk::compress(data, 3).unwrap_or_default(), 1 << 20).map_or(0, |v| v.len())' ;;
    # A dictionary adds its own bytes: 16 KiB of them here, as trained in the bench.
    zstd-dict) echo '{ static DICT: [u8; 16384] = [7; 16384]; let d = std::hint::black_box(&DICT[..]); let c = zstd::bulk::Compressor::with_dictionary(3, d).and_then(|mut c| c.compress(data)).unwrap_or_default(); zstd::bulk::Decompressor::with_dictionary(d).and_then(|mut z| z.decompress(&c, 1 << 20)).map_or(0, |v| v.len()) }' ;;
    esac
}

flags=$(rustflags_of "$target")
upper=$(tr 'a-z-' 'A-Z_' <<<"$target")
if [[ $(route_of "$target") == nightly ]]; then
    toolchain=$NIGHTLY
    extra=(-Zbuild-std=std,panic_abort)
else
    toolchain=$STABLE
    extra=()
fi

base=""
printf '%-10s %12s %10s\n' codec bytes added
for codec in $codecs; do
    copy=$work/$codec
    rm -rf "$copy"
    mkdir -p "$copy"
    git -C "$root" archive "$rev" | tar -x -C "$copy"
    if [[ $codec != none ]]; then
        dep=$(dep_of "$codec")
        grep -q "^${dep%% *} =" "$copy/Cargo.toml" ||
            sed -i "/^\[dependencies\]/a $dep" "$copy/Cargo.toml"
        # Run with an argument no one passes, so the codec is linked but never on
        # the normal path; black_box keeps the data opaque to the optimiser.
        perl -0pi -e 's/fn main\(\) -> ExitCode \{/fn main() -> ExitCode {\n    if std::env::args().nth(1).as_deref() == Some("--codec-size-probe") {\n        let data = std::hint::black_box(std::env::args().collect::<String>().into_bytes());\n        let data = &data[..];\n        return ExitCode::from(('"$(use_of "$codec" | sed 's/[\/&]/\\&/g')"') as u8);\n    }/' "$copy/src/main.rs"
        grep -q codec-size-probe "$copy/src/main.rs" || { echo "could not patch main.rs" >&2; exit 1; }
    fi
    (cd "$copy" && env "CARGO_TARGET_${upper}_RUSTFLAGS=$flags" \
        nice -n 19 cargo "+$toolchain" zigbuild --release --target "$target" "${extra[@]}" \
        --bin outpost -q)
    size=$(stat -c %s "$CARGO_TARGET_DIR/$target/release/outpost")
    [[ -z $base ]] && base=$size
    printf '%-10s %12d %+10d\n' "$codec" "$size" $((size - base))
done
