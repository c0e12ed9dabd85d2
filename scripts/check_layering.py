#!/usr/bin/env python3
"""Layering check: no component includes a component above it.

Every `#include "dir/file.h"` in a component's .h/.cpp files must name the
component itself or one on a strictly lower level. The order, bottom-up (the
same order is in README.md, "Source tree"):

  0  common                 Status, UniqueFd, file I/O, logging, fault injection
  1  config, db             YAML configuration; the SQLite wrapper and migrations
  2  engine                 reactors, BlockDevice, FileDisk, change tracking, cuts
  3  store                  restore point store (chunks, packs, catalog, GC)
  4  nbd, ublk, disks       NBD server; ublk devices; disk domain (DiskService, metadata.db rows)
  5  restore                VMs, collections, restore point jobs, restores, exports
  6  control                the HTTP edge: connections, router, handlers
  7  daemon                 rpointd: flags, sockets, signals, wiring
  cli (separate)            the rpoint client: may include common, and control/
                            only for control/beast.h; nothing includes cli

An include of a directory that is not a component (a new folder) fails too,
so a new component is placed in this table when it is added.

Usage: check_layering.py [SOURCE_ROOT]   (exit 1 and one line per violation)
"""
import os
import re
import sys

LEVELS = {
    "common": 0,
    "config": 1,
    "db": 1,
    "engine": 2,
    "store": 3,
    "nbd": 4,
    "ublk": 4,
    "disks": 4,
    "restore": 5,
    "control": 6,
    "daemon": 7,
}
# cli is outside the stack: what it may include, file by file if need be.
CLI_ALLOWED = {"common": None, "control": {"control/beast.h"}}

INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"/]+)/([^"]+)"', re.M)


def check(root):
    bad = []
    for comp in sorted(list(LEVELS) + ["cli"]):
        d = os.path.join(root, comp)
        if not os.path.isdir(d):
            continue
        for dirpath, _, files in os.walk(d):
            for f in sorted(files):
                if not f.endswith((".h", ".cpp")):
                    continue
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, root)
                with open(path, encoding="utf-8", errors="replace") as fh:
                    text = fh.read()
                for m in INCLUDE.finditer(text):
                    target, header = m.group(1), m.group(1) + "/" + m.group(2)
                    line = text.count("\n", 0, m.start()) + 1
                    where = f"{rel}:{line}: includes {header}"
                    if target == comp:
                        continue
                    if comp == "cli":
                        if target not in CLI_ALLOWED:
                            bad.append(f"{where}: cli may include only {sorted(CLI_ALLOWED)}")
                        elif CLI_ALLOWED[target] is not None and header not in CLI_ALLOWED[target]:
                            bad.append(f"{where}: cli may include only {sorted(CLI_ALLOWED[target])} of {target}/")
                        continue
                    if target not in LEVELS:
                        what = "cli (nothing includes cli)" if target == "cli" else "not a known component"
                        bad.append(f"{where}: {target}/ is {what} (scripts/check_layering.py)")
                    elif LEVELS[target] >= LEVELS[comp]:
                        bad.append(f"{where}: {comp}/ (level {LEVELS[comp]}) may not include "
                                   f"{target}/ (level {LEVELS[target]}): it is not below it")
    return bad


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..")
    bad = check(root)
    for b in bad:
        print(b)
    if bad:
        print(f"layering: {len(bad)} include(s) break the component order", file=sys.stderr)
        return 1
    print("layering: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
