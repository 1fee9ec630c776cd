#!/usr/bin/env bash
# Assemble an installable OpenWrt package (.ipk, opkg format) from a cross-built
# outpost binary, without the OpenWrt SDK, then check it by unpacking it and printing
# its control data and files.
#
#   openwrt/make-ipk.sh mipsel                       # binary from cross/build-all.sh
#   openwrt/make-ipk.sh mips --arch mips_24kc
#   openwrt/make-ipk.sh aarch64 --bin path/to/outpost --out dir/
#
# The binary is static, so one package serves every subtarget of an ISA; --arch must
# still name an architecture the router's opkg lists (`opkg print-architecture`).
# OpenWrt 24.10 and older use opkg; 25.x images use apk and need the SDK route.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
# shellcheck source=cross/targets.sh
source "$root/cross/targets.sh"
say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

(($#)) || { sed -n '2,12p' "$0"; exit 2; }
target=$(resolve_target "$1")
shift
bin="$root/target/dist/$target/outpost"
out="$root/target/dist/openwrt"
arch=""
while (($#)); do
    case $1 in
    --arch) arch=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
# The most common OpenWrt architecture per target (see boards/).
if [[ -z $arch ]]; then
    case $target in
    x86_64-*) arch=x86_64 ;;
    aarch64-*) arch=aarch64_cortex-a53 ;;
    armv7-*) arch=arm_cortex-a7_neon-vfpv4 ;;
    arm-*) arch=arm_arm1176jzf-s_vfp ;;
    mipsel-*) arch=mipsel_24kc ;;
    mips-*) arch=mips_24kc ;;
    esac
fi
[[ -x $bin ]] || { echo "no binary at $bin (run cross/build-all.sh ${target%%-*})" >&2; exit 1; }

version=$(awk -F'"' '/^version *=/ { print $2; exit }' "$root/Cargo.toml")
release=1
pkg="outpost_${version}-${release}_${arch}.ipk"
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

say "staging files for $arch from $bin"
data="$work/data"
install -D -m 0755 "$bin" "$data/usr/bin/outpost"
install -D -m 0755 "$here/files/outpost.init" "$data/etc/init.d/outpost"
install -D -m 0600 "$here/files/outpost.config" "$data/etc/config/outpost"
install -D -m 0644 "$here/files/outpost.keep" "$data/lib/upgrade/keep.d/outpost"

ctl="$work/control"
mkdir -p "$ctl"
size=$(du -sk --apparent-size "$data" | cut -f1)
cat >"$ctl/control" <<CONTROL
Package: outpost
Version: ${version}-${release}
Depends: 
Source: outpost
SourceName: outpost
License: Apache-2.0
Section: net
Architecture: ${arch}
Installed-Size: $((size * 1024))
Maintainer: outpost developers
Description: Store-and-forward command and file agent over MQTT.
 One static binary ($target) for nodes on satellite, GSM or other flaky links.
CONTROL
printf '/etc/config/outpost\n' >"$ctl/conffiles"
# Same shape as the SDK's default postinst/prerm: act only on a live system, not
# while an image is being assembled ($IPKG_INSTROOT set).
cat >"$ctl/postinst" <<'SCRIPT'
#!/bin/sh
[ -n "$IPKG_INSTROOT" ] && exit 0
/etc/init.d/outpost enable
/etc/init.d/outpost restart 2>/dev/null
exit 0
SCRIPT
cat >"$ctl/prerm" <<'SCRIPT'
#!/bin/sh
[ -n "$IPKG_INSTROOT" ] && exit 0
/etc/init.d/outpost stop 2>/dev/null
/etc/init.d/outpost disable
exit 0
SCRIPT
chmod 0755 "$ctl/postinst" "$ctl/prerm"

# ipkg-build layout: a gzipped tar of debian-binary, control.tar.gz, data.tar.gz,
# owned by root, with reproducible timestamps.
epoch=$(git -C "$root" log -1 --format=%ct 2>/dev/null || echo 0)
tarit() { tar --numeric-owner --owner=0 --group=0 --sort=name --mtime="@$epoch" "$@"; }
echo "2.0" >"$work/debian-binary"
(cd "$ctl" && tarit -czf "$work/control.tar.gz" ./)
(cd "$data" && tarit -czf "$work/data.tar.gz" ./)
(cd "$work" && tarit -czf "$out/$pkg" ./debian-binary ./data.tar.gz ./control.tar.gz)
say "wrote $out/$pkg"

# --- check: unpack what we wrote and read it back ------------------------------------
chk="$work/check"
mkdir -p "$chk"
tar -xzf "$out/$pkg" -C "$chk"
[[ $(cat "$chk/debian-binary") == 2.0 ]] || { echo "bad debian-binary" >&2; exit 1; }
mkdir -p "$chk/c" "$chk/d"
tar -xzf "$chk/control.tar.gz" -C "$chk/c"
tar -xzf "$chk/data.tar.gz" -C "$chk/d"
echo "--- control"
cat "$chk/c/control"
echo "--- conffiles"
cat "$chk/c/conffiles"
echo "--- files"
tar -tvzf "$chk/data.tar.gz" | awk '{ print $1, $2, $3, $NF }'
grep -qx "Architecture: $arch" "$chk/c/control"
cmp -s "$chk/d/usr/bin/outpost" "$bin" || { echo "binary differs after unpacking" >&2; exit 1; }
sh -n "$chk/d/etc/init.d/outpost"
echo
printf '%-40s %-28s %10s  %s\n' package architecture bytes binary
printf '%-40s %-28s %10s  %s\n' "$pkg" "$arch" "$(stat -c %s "$out/$pkg")" "$(file -b "$chk/d/usr/bin/outpost" | cut -d, -f1-2)"
