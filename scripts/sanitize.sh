#!/usr/bin/env bash
# `make sanitize`: the native pool built with AddressSanitizer + UndefinedBehaviorSanitizer,
# running the kvpool tests (hostile files and the fixed-seed fuzz run included) against it.
# Any sanitizer report fails the run (UBSan aborts on the first; ASan on any bad access).
#   scripts/sanitize.sh [pytest args...]      default: tests/kvpool
# The build happens in a copy of the tracked tree under .beluga/sanitize, so the normal
# module in the checkout is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
py="$root/.venv/bin/python"
work="$root/.beluga/sanitize"
asan="$(gcc -print-file-name=libasan.so)"
# libstdc++ preloaded with it: python itself does not link it, and ASan's __cxa_throw
# interceptor must find the real one when the first C++ exception is thrown.
cxx="$(gcc -print-file-name=libstdc++.so)"
[ -f "$asan" ] || { echo "sanitize: no libasan.so from gcc (install gcc's libasan)" >&2; exit 2; }
rm -rf "$work/tree"
mkdir -p "$work/tree"
git ls-files -z --cached --others --exclude-standard \
  | grep -z -v '^beluga_native' | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -T - -cf - | tar -xf - -C "$work/tree"
cd "$work/tree"
echo "sanitize: building beluga_native with ASan + UBSan"
BELUGA_SANITIZE=1 BELUGA_BUILD_CUDA=0 "$py" setup.py -q build_ext --inplace \
  --build-temp "$work/build" >"$work/build.log" 2>&1 \
  || { tail -30 "$work/build.log"; exit 1; }
log="$work/report.log"
: >"$log"
echo "sanitize: running ${*:-tests/kvpool} (reports to $log)"
set +e
# Python's own allocations are not ours to leak-check; reports go to the log and the
# terminal. The children the tests start inherit the preload and the options.
LD_PRELOAD="$asan $cxx" \
ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:log_path=$work/asan" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$work/ubsan" \
  "$py" -m pytest -q -p no:cacheprovider -m "not e2e" "${@:-tests/kvpool}"
rc=$?
set -e
cat "$work"/asan.* "$work"/ubsan.* 2>/dev/null >>"$log" || true
rm -f "$work"/asan.* "$work"/ubsan.*
if [ -s "$log" ]; then
  echo "sanitize: sanitizer reports:" >&2
  head -60 "$log" >&2
  exit 1
fi
[ $rc -eq 0 ] && echo "sanitize: 0 sanitizer reports, tests passed"
exit $rc
