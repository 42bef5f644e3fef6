#!/usr/bin/env bash
# Fails when a locked dependency declares a newer rust-version than the workspace does:
# the declared MSRV would then be a promise no build can keep. Only one toolchain can be
# installed here, so this is the check we can run for the MSRV.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo metadata --format-version 1 --all-features --locked | python3 -c '
import json, sys
m = json.load(sys.stdin)
def v(s): return tuple((list(map(int, s.split(".")[:3])) + [0, 0])[:3])
resolved = {n["id"] for n in m["resolve"]["nodes"]}
ours = {p["name"]: p.get("rust_version") for p in m["packages"] if p["id"] in m["workspace_members"]}
declared = min(v(r) for r in ours.values() if r)
newer = sorted((p["rust_version"], p["name"]) for p in m["packages"]
               if p["id"] in resolved and p["id"] not in m["workspace_members"]
               and p.get("rust_version") and v(p["rust_version"]) > declared)
if newer:
    sys.exit("rust-version %s is below what these dependencies need: %s" % (".".join(map(str, declared)), newer))
print("rust-version", ".".join(map(str, declared)), "covers every locked dependency")
'
