# shellcheck shell=bash
# Helpers shared by the benchmark scripts (sourced).

# The median of the numbers on standard input, one per line.
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
# The words of $1, one per line (empty words dropped).
values() { tr ' ' '\n' <<<"$1" | grep .; }
