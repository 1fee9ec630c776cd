#!/usr/bin/env bash
# Build a Debian package (Raspberry Pi OS, Debian, Ubuntu) from the static binary:
# cross/build-all.sh builds it, cargo-deb packages it with the systemd unit, the
# `outpost` system user (postinst), /var/lib/outpost (StateDirectory=) and
# /etc/outpost/outpost.toml as a conffile. Then the package is unpacked and checked.
#
#   debian/build-deb.sh x86_64     # amd64
#   debian/build-deb.sh aarch64    # arm64 (Pi 3/4/5 64-bit, arm64 gateways)
#   debian/build-deb.sh armv6      # armhf that runs on every Pi (32-bit OS)
#   debian/build-deb.sh armv7      # armhf for ARMv7+ only (Debian armhf gateways)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
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
    FOOTPRINT=0 "$root/cross/build-all.sh" "$target"
fi
# cargo-deb takes the binary from $CARGO_TARGET_DIR/<target>/release/outpost.
if [[ $(route_of "$target") == nightly ]]; then
    export CARGO_TARGET_DIR="$root/target/cross-nightly"
else
    export CARGO_TARGET_DIR="$root/target/cross-stable"
fi
out="$root/target/dist/deb"
mkdir -p "$out"
say "cargo deb --target $target"
deb=$(cd "$root" && cargo deb --no-build --no-strip --target "$target" --output "$out" 2>&1 | tail -n 1)
[[ -f $deb ]] || { echo "cargo deb failed: $deb" >&2; exit 1; }

# --- check -----------------------------------------------------------------------------
echo "--- control"
dpkg-deb --field "$deb"
echo "--- conffiles"
dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles
echo "--- files"
dpkg-deb --contents "$deb" | awk '{ print $1, $2, $NF }'
dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./postinst | grep -q 'adduser --system' ||
    { echo "postinst does not create the user" >&2; exit 1; }
dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles | grep -qx /etc/outpost/outpost.toml ||
    { echo "config is not a conffile" >&2; exit 1; }
dpkg-deb --contents "$deb" | grep -q 'lib/systemd/system/outpost.service' ||
    { echo "no systemd unit in the package" >&2; exit 1; }
echo
printf '%-48s %-8s %10s\n' package arch bytes
printf '%-48s %-8s %10s\n' "$(basename "$deb")" "$(dpkg-deb --field "$deb" Architecture)" "$(stat -c %s "$deb")"
