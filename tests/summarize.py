#!/usr/bin/python3
"""Sums every result of a ./test run into one line: `N passed, N failed[, N skipped]`.

Inputs (all optional; whatever a run produced):
  --meson LABEL=PATH   meson's testlog.json of a `meson test --suite unit` run. Each
                       doctest executable counts its test cases (from doctest's summary
                       line); an executable that failed without doctest reporting a
                       failed case (crash, sanitizer report at exit, timeout) counts one
                       more failure.
  --junit LABEL=PATH   a pytest --junitxml file: one count per testcase (failure or
                       error -> failed; skipped -> skipped; else passed).
  --stage NAME=STATUS  a step of ./test (deps, build, ...); STATUS other than ok is one
                       failure, so a broken build can never end as "0 failed".

Prints a short breakdown, then the total as the very last line. Exit status: 0 when
nothing failed and at least one test ran, 1 otherwise.
"""
import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET

ANSI = re.compile(r"\x1b\[[0-9;]*m")
DOCTEST = re.compile(r"\[doctest\] test cases:\s*(\d+)\s*\|\s*(\d+) passed\s*\|\s*(\d+) failed"
                     r"\s*\|\s*(\d+) skipped")


class Tally:
    def __init__(self):
        self.passed = self.failed = self.skipped = 0
        self.failures = []  # names, for the breakdown

    def add(self, other):
        self.passed += other.passed
        self.failed += other.failed
        self.skipped += other.skipped
        self.failures += other.failures

    def line(self):
        s = f"{self.passed} passed, {self.failed} failed"
        if self.skipped:
            s += f", {self.skipped} skipped"
        return s


def meson_log(path):
    t = Tally()
    try:
        with open(path) as f:
            entries = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        t.failed += 1
        t.failures.append(f"cannot read {path}: {e}")
        return t
    for e in entries:
        name = e.get("name", "?")
        out = ANSI.sub("", (e.get("stdout") or "") + (e.get("stderr") or ""))
        m = None
        for m in DOCTEST.finditer(out):
            pass  # the last summary line wins
        result = e.get("result", "")
        ok = result in ("OK", "EXPECTEDFAIL")
        if m:
            _total, passed, failed, skipped = (int(x) for x in m.groups())
            t.passed += passed
            t.failed += failed
            t.skipped += skipped
            if failed:
                t.failures.append(f"{name}: {failed} test case(s) failed")
            if not ok and failed == 0:
                t.failed += 1
                t.failures.append(f"{name}: {result} (rc={e.get('returncode')}) after its cases passed")
        elif result == "SKIP":
            t.skipped += 1
        elif ok:
            t.passed += 1  # not a doctest binary: one test
        else:
            t.failed += 1
            t.failures.append(f"{name}: {result} (rc={e.get('returncode')}), no doctest summary")
    return t


def junit(path):
    t = Tally()
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        t.failed += 1
        t.failures.append(f"no pytest results ({path}: {e})")
        return t
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        tags = {child.tag for child in case}
        if tags & {"failure", "error"}:
            t.failed += 1
            t.failures.append(name)
        elif "skipped" in tags:
            t.skipped += 1
        else:
            t.passed += 1
    return t


def pair(s):
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected LABEL=VALUE, got {s!r}")
    return tuple(s.split("=", 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--meson", type=pair, action="append", default=[])
    ap.add_argument("--junit", type=pair, action="append", default=[])
    ap.add_argument("--stage", type=pair, action="append", default=[])
    a = ap.parse_args()

    total = Tally()
    rows = []
    for name, status in a.stage:
        if status != "ok":
            t = Tally()
            t.failed = 1
            t.failures.append(f"{name}: {status}")
            rows.append((f"step {name}", t))
    for label, path in a.meson:
        rows.append((label, meson_log(path)))
    for label, path in a.junit:
        rows.append((label, junit(path)))

    print("---- summary " + "-" * 60)
    for label, t in rows:
        print(f"  {label:<22} {t.line()}")
        for f in t.failures[:20]:
            print(f"      FAILED {f}")
        if len(t.failures) > 20:
            print(f"      ... and {len(t.failures) - 20} more")
        total.add(t)
    ran = total.passed + total.failed
    if ran == 0:
        print("  no tests ran: that is a failure")
    print(total.line())
    return 0 if total.failed == 0 and ran > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
