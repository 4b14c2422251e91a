#!/usr/bin/env bash
# Sums the `test result:` lines of `cargo test` output (a file, or standard input) and
# prints the totals on one line: `N passed, N failed`.
set -euo pipefail
awk '/^test result:/ {
       for (i = 1; i < NF; i++) {
         if ($(i + 1) ~ /^passed/) passed += $i
         if ($(i + 1) ~ /^failed/) failed += $i
       }
     }
     END { printf "%d passed, %d failed\n", passed, failed }' "${1:-/dev/stdin}"
