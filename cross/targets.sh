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

# stable: rustup ships a prebuilt musl std. nightly: -Zbuild-std, which also allows
# panic=immediate-abort and a std compiled for size. aarch64 has a prebuilt std but
# takes the nightly route for size: 3.14 MB on stable, over its 3.0 MB budget.
route_of() {
    case $1 in
    x86_64-unknown-linux-musl) echo stable ;;
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
    f="$f $(time_cfg_of "$1")"
    f="${f% }"
    echo "${f# }"
}

# rustix on 32-bit mips (its libc backend: no stable inline asm there) assumes musl's
# 64-bit time_t and passes its own Timespec/Itimerspec to libc by pointer cast, while
# the libc crate (0.2, without --cfg libc_unstable_musl_v1_2) declares 32-bit time_t
# and links the old names, which zig's musl 1.2 keeps as time32 shims. The shim reads
# rustix's 32-byte itimerspec as a 16-byte one: it_value comes out 0, timerfd_settime
# disarms the timer, and every smol/async-io Timer never fires. `--cfg fix_y2038`
# switches rustix to its converting path (as rustix does itself for i686 musl), which
# is right against musl 1.1 and 1.2 alike. The libc crate's musl 1.2 cfg is no fix:
# big-endian musl puts the time64 timespec's padding before tv_nsec, rustix after.
# ARM (armv7, armv6) is unaffected: rustix uses raw syscalls there.
# Also for `cargo test` (cross/test-qemu.sh) and belongs in .cargo/config.toml.
time_cfg_of() {
    case $1 in
    mips-* | mipsel-*) echo "--cfg fix_y2038" ;;
    esac
}

# Flags for `cargo test` under qemu: those of .cargo/config.toml, the build-std link
# flags for every nightly target (the config has them for mips only, so an armv7 or
# armv6 test failed to link: "failed to open object crt1.o"), and the time cfg.
# CARGO_TARGET_<T>_RUSTFLAGS replaces the config's flags, so they are all repeated.
# Not immediate-abort: the test harness reports a failing test through a panic.
test_rustflags_of() {
    local f=""
    # build-std has no self-contained crt objects (crt1.o): zig supplies them.
    [[ $(route_of "$1") == nightly ]] && f="-C target-feature=+crt-static -C link-self-contained=no"
    case $1 in
    armv7-*) f="$f -C target-feature=+thumb-mode" ;;
    esac
    f="$f $(time_cfg_of "$1")"
    f="${f% }"
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
