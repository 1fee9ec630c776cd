#!/usr/bin/env bash
# Build a Debian package (Raspberry Pi OS, Debian, Ubuntu) from the static binary:
# cross/build-all.sh builds it, cargo-deb packages it with the systemd unit, the
# `outpost` system user (postinst), /var/lib/outpost (StateDirectory=) and
# /etc/outpost/outpost.toml as a conffile. Then the package is unpacked and checked.
#
#   cross/debian/build-deb.sh x86_64     # amd64
#   cross/debian/build-deb.sh aarch64    # arm64 (Pi 3/4/5 64-bit, arm64 gateways)
#   cross/debian/build-deb.sh armv6      # armhf that runs on every Pi (32-bit OS)
#   cross/debian/build-deb.sh armv7      # armhf for ARMv7+ only (Debian armhf gateways)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source=cross/targets.sh
source "$root/cross/targets.sh"
say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

target=$(resolve_target "${1:-x86_64}")
case $target in
mips*) echo "Debian has no mips/mipsel port any more; use openwrt/make-ipk.sh" >&2; exit 2 ;;
esac

if ! command -v cargo-deb >/dev/null; then
    say "installing cargo-deb"
    nice -n 19 cargo install --locked cargo-deb
fi
command -v dpkg-deb >/dev/null || { say "installing dpkg"; apt-get install -y dpkg >/dev/null; }

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    "$root/cross/build-all.sh" "$target"
fi
# cargo-deb takes the binary from $CARGO_TARGET_DIR/<target>/release/outpost; stage
# the checked, stripped one from target/dist there (a KEEP_SYMBOLS build leaves an
# unstripped binary in the cargo target directory).
export CARGO_TARGET_DIR="$root/target/deb-stage"
mkdir -p "$CARGO_TARGET_DIR/$target/release"
cp "$root/target/dist/$target/outpost" "$CARGO_TARGET_DIR/$target/release/outpost"
out="$root/target/dist/deb"
mkdir -p "$out"
say "cargo deb --target $target"
deb=$(cd "$root" && cargo deb --no-build --no-strip --target "$target" --output "$out" 2>&1 | tail -n 1)
[[ -f $deb ]] || { echo "cargo deb failed: $deb" >&2; exit 1; }

# --- check -----------------------------------------------------------------------------
# Read everything into variables first: `grep -q` on a pipe would SIGPIPE dpkg-deb.
ctrl=$(mktemp -d)
trap 'rm -rf "$ctrl"' EXIT
dpkg-deb --control "$deb" "$ctrl"
contents=$(dpkg-deb --contents "$deb")
echo "--- control"
cat "$ctrl/control"
echo "--- conffiles"
cat "$ctrl/conffiles"
echo "--- files"
awk '{ print $1, $2, $NF }' <<<"$contents"
check() { "$@" >/dev/null || { echo "check failed: ${*: -2}" >&2; exit 1; }; }
check grep 'adduser --system' "$ctrl/postinst"
check grep -x /etc/outpost/outpost.toml "$ctrl/conffiles"
check grep 'lib/systemd/system/outpost.service$' <<<"$contents"
check grep './usr/bin/outpost$' <<<"$contents"
mkdir "$ctrl/data"
dpkg-deb --extract "$deb" "$ctrl/data"
echo
printf '%-48s %-8s %10s  %s\n' package arch bytes binary
printf '%-48s %-8s %10s  %s\n' "$(basename "$deb")" "$(dpkg-deb --field "$deb" Architecture)" \
    "$(stat -c %s "$deb")" "$(file -b "$ctrl/data/usr/bin/outpost" | grep -o "statically linked" || echo "NOT STATIC")"
