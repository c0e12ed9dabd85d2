#!/usr/bin/env bash
# Wrapper: the benchmark itself is bench/nbd-bench.py (run with Debian's python).
# See `bench/nbd-bench.sh --help`.
exec /usr/bin/python3 "$(dirname "$(readlink -f "$0")")/nbd-bench.py" "$@"
