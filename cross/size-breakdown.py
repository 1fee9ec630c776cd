#!/usr/bin/env python3
"""Code size per crate of an unstripped binary (from KEEP_SYMBOLS=1 cross/build-all.sh).

    cross/size-breakdown.py target/dist/mipsel-unknown-linux-musl/outpost.syms

Sums `nm --size-sort -S -C` sizes of text and read-only data symbols by the first
crate named in each demangled symbol. With LTO, generic code is attributed to the
crate that defined it (e.g. `core::` for iterator adapters instantiated elsewhere),
and inlined code to its caller: read the table as an estimate, like cargo-bloat's.
"""
import collections
import glob
import os
import re
import subprocess
import sys

C_GROUPS = [
    (re.compile(r"^(sqlite3|sqlite|fts|rtree|json|wal|btree|pager|vdbe|pcache|os_|unix)", re.I), "sqlite (C)"),
    (re.compile(r"^(ring_core_|GFp|ecp_nistz|p256_|nistz|x25519_|ChaCha20|CRYPTO_|OPENSSL_|bn_|aes_|gcm_|sha\d|fiat_|limbs_|LIMBS_|poly1305)"), "ring (C/asm)"),
]
CRATE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)::")
SKIP = {"_", "impl", "dyn", "for", "as", "mut", "const"}


def c_symbols(binary: str) -> dict[str, str]:
    """Names defined by the C/asm archives build scripts made for this target
    (bundled SQLite, ring), found next to target/dist/<triple>/ in target/cross-*/."""
    triple = os.path.basename(os.path.dirname(os.path.abspath(binary)))
    root = os.path.abspath(os.path.join(os.path.dirname(binary), "..", "..", ".."))
    owner: dict[str, str] = {}
    for archive in glob.glob(f"{root}/target/cross-*/{triple}/release/build/*/out/**/*.a", recursive=True):
        crate = os.path.basename(archive.split("/out/")[0]).rsplit("-", 1)[0]
        group = {"libsqlite3-sys": "sqlite (C)", "ring": "ring (C/asm)"}.get(crate, f"{crate} (C)")
        out = subprocess.run(["nm", "--defined-only", archive], capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3:
                owner.setdefault(parts[2], group)
    return owner


def crate_of(name: str) -> str:
    for pattern, group in C_GROUPS:
        if pattern.search(name):
            return group
    stripped = name.lstrip("<&*")
    for m in CRATE.finditer(stripped):
        if m.group(1) not in SKIP:
            return m.group(1)
    return "C: libc, compiler-rt, other"


def main() -> None:
    path = sys.argv[1]
    out = subprocess.run(
        ["nm", "--size-sort", "-S", "-C", path], check=True, capture_output=True, text=True
    ).stdout
    owner = c_symbols(path)
    sizes: dict[str, int] = collections.Counter()
    for line in out.splitlines():
        parts = line.split(" ", 3)
        if len(parts) < 4 or parts[2] not in "tTrRwWvV":
            continue
        name = parts[3]
        # Static C functions may carry a suffix the compiler added (foo.constprop.0).
        group = owner.get(name) or owner.get(name.split(".")[0]) or crate_of(name)
        sizes[group] += int(parts[1], 16)
    total = sum(sizes.values())
    print(f"| crate | bytes | share |\n| --- | ---: | ---: |")
    for crate, n in sorted(sizes.items(), key=lambda kv: -kv[1])[:25]:
        print(f"| {crate} | {n:,} | {100 * n / total:.1f}% |")
    print(f"| **symbols total** | {total:,} | 100% |")


if __name__ == "__main__":
    main()
