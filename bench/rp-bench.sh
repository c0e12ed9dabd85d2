#!/usr/bin/env bash
# Wrapper: the restore point benchmark is bench/rp-bench.py (run with Debian's
# python, which has python3-libnbd). See `bench/rp-bench.sh --help`.
exec /usr/bin/python3 "$(dirname "$(readlink -f "$0")")/rp-bench.py" "$@"
