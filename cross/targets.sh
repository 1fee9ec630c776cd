# Shared by the cross/ scripts: the six targets, how each is built and run.
# shellcheck shell=bash

STABLE=${STABLE:-stable}
NIGHTLY=${NIGHTLY:-nightly}

ALL_TARGETS=(
    x86_64-unknown-linux-musl
    aarch64-unknown-linux-musl
    armv7-unknown-linux-musleabihf
    arm-unknown-linux-musleabihf
    mipsel-unknown-linux-musl
    mips-unknown-linux-musl
)

# Extra C flags for the target's C code (cc reads CFLAGS_<triple>; applies to every
# crate's C and assembly). Empty today. Thumb-2 SQLite on armv7 would save more
# (zig ignores -mthumb; -mcpu=generic+v7a+vfp3-d32+thumb2-neon+thumb_mode works for
# C but breaks ring's ARM-mode assembly, so it needs a per-file CC wrapper).
declare -A CFLAGS_OF=()

# Accept short names: x86_64 aarch64 armv7 armv6 mipsel mips.
resolve_target() {
    case $1 in
    x86_64) echo x86_64-unknown-linux-musl ;;
    aarch64) echo aarch64-unknown-linux-musl ;;
    armv7) echo armv7-unknown-linux-musleabihf ;;
    armv6 | arm) echo arm-unknown-linux-musleabihf ;;
    mipsel) echo mipsel-unknown-linux-musl ;;
    mips) echo mips-unknown-linux-musl ;;
    *-*) echo "$1" ;;
    *) echo "unknown target $1" >&2; return 1 ;;
    esac
}

# stable: rustup ships a prebuilt musl std. nightly: -Zbuild-std.
route_of() {
    case $1 in
    x86_64-unknown-linux-musl | aarch64-unknown-linux-musl) echo stable ;;
    *) echo nightly ;;
    esac
}

# RUSTFLAGS for the target's own code (not build scripts).
rustflags_of() {
    local f=""
    if [[ $(route_of "$1") == nightly ]]; then
        # build-std: link musl's crt through zig, not the self-contained copy that a
        # build-std sysroot lacks; mips musl targets default to dynamic linking.
        # immediate-abort drops the panic machinery (-12% on mipsel).
        f="-C link-self-contained=no -C target-feature=+crt-static -Zunstable-options -C panic=immediate-abort"
    fi
    case $1 in
    # Thumb-2 is about 20% smaller than ARM code; every ARMv7 core runs it.
    armv7-*) f="$f -C target-feature=+thumb-mode" ;;
    esac
    echo "${f# }"
}

# qemu-user binary and CPU model that match the target's oldest supported core.
qemu_of() {
    case $1 in
    x86_64-*) echo "" ;;
    aarch64-*) echo "qemu-aarch64-static" ;;
    armv7-*) echo "qemu-arm-static -cpu cortex-a7" ;;
    arm-*) echo "qemu-arm-static -cpu arm1176" ;;
    mipsel-*) echo "qemu-mipsel-static" ;;
    mips-*) echo "qemu-mips-static" ;;
    esac
}
