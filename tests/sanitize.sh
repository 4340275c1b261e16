#!/usr/bin/env bash
# Builds lstm_ext with AddressSanitizer and UndefinedBehaviorSanitizer (CMake,
# -DLSTM_EXT_SANITIZE=ON) and runs a subset of the test suite against that build.
#
#   tests/sanitize.sh [extra pytest arguments, e.g. --maxfail=3]
#
# PYTHON picks the interpreter (default: python on PATH; it needs torch, pytest and hypothesis),
# BUILD_DIR the build tree (default: build/asan). Needs CMake, Ninja and GCC. Not part of CI: the
# build takes minutes and the tests run several times slower than usual.
#
# The build stops at the first undefined behaviour (-fno-sanitize-recover), and ASan at the first
# error; either kills the test process. So pytest runs in rounds: after a sanitizer kill the
# round's current test and its report are recorded, and the next round starts at the test after
# it. At the end the script lists every report and failed test, and exits 0 only if there were
# none. (The malformed-input fuzz runs its cases in child processes, under the sanitizers too: a
# report there fails that test, with the report in its message.)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=$(command -v "${PYTHON:-python}")
build=${BUILD_DIR:-$repo/build/asan}

cmake -S "$repo" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLSTM_EXT_SANITIZE=ON \
  -DPython3_EXECUTABLE="$python"
cmake --build "$build"

# python is not built with the sanitizers, so their runtimes must be preloaded, from the compiler
# that built the library.
compiler=$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' "$build/CMakeCache.txt")
runtimes=()
for runtime in libasan.so libubsan.so; do
  path=$("$compiler" -print-file-name="$runtime")
  if [[ ! -f $path ]]; then
    echo "sanitize.sh: $compiler has no $runtime (GCC's sanitizer runtimes are needed)" >&2
    exit 1
  fi
  runtimes+=("$path")
done

# The tests must import the sanitized library, not the installed lstm_ext/_C*.so: copy the package
# and the tests to a scratch directory, put the sanitized library in, and that directory first on
# PYTHONPATH. csrc/ stays behind on purpose: without it a failing import of _C is an error, not a
# silent fallback to an unsanitized JIT build.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r "$repo/lstm_ext" "$repo/tests" "$work/"
rm -f "$work"/lstm_ext/_C*.so
cp "$build"/lstm_ext/_C*.so "$work/lstm_ext/"
find "$work" -name __pycache__ -prune -exec rm -rf {} +

# The environment of the python processes only (the shell tools here are not to run under ASan).
# A sanitizer exits with 99, so that its kills tell apart from test failures (exit 1). CPython
# and torch keep memory until exit by design, so leak reports would be noise. A huge allocation
# must fail as it does without ASan (torch raises), not abort. PYTHONUNBUFFERED: pytest's output
# must reach the log before a sanitizer kills it.
sanitized=(
  env "LD_PRELOAD=${runtimes[0]}:${runtimes[1]}"
  ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:exitcode=99
  UBSAN_OPTIONS=print_stacktrace=1:exitcode=99
  "PYTHONPATH=$work${PYTHONPATH:+:$PYTHONPATH}"
  PYTHONUNBUFFERED=1
  "$python"
)
cd "$work"
"${sanitized[@]}" -c 'import sys, lstm_ext._C as c; assert c.__file__.startswith(sys.argv[1]), c.__file__' "$work"

# Not run: the JIT build (it compiles an unsanitized copy), the benchmark smoke test, and the RSS
# checks (ASan's shadow memory and quarantine of freed blocks make RSS meaningless).
tests=(
  tests/test_bad_input.py tests/test_robustness.py tests/test_fuzz.py tests/test_lstm_parity.py
  tests/test_cell.py tests/test_module.py tests/test_gradcheck.py tests/test_dropout.py
)
# --capture=sys: the reports are written to file descriptor 2, which pytest's default capture
# would swallow along with the dying process; this way they land in the log after the test's id.
pytest=("${sanitized[@]}" -m pytest -p no:cacheprovider --capture=sys -k "not rss_stays_flat" "$@")
mapfile -t remaining < <("${pytest[@]}" --collect-only -q "${tests[@]}" | grep '::')
echo "sanitize.sh: ${#remaining[@]} tests"

killed=()   # ids of the tests a sanitizer killed
reports=()  # and its report on each
failed=()   # ids of the tests that failed
round=0
while ((${#remaining[@]})); do
  round=$((round + 1))
  log=$work/round$round.log
  status=0
  "${pytest[@]}" -v "${remaining[@]}" 2>&1 | tee "$log" || status=$?
  mapfile -t -O "${#failed[@]}" failed < <(grep -oE '^tests/[^ ]+::[^ ]+ FAILED' "$log" | cut -d ' ' -f 1)
  ((status == 99)) || break
  # pytest -v writes a test's id before running it, and the report follows on the same line.
  current=$(grep '^tests/[^ ]*::' "$log" | tail -n 1 | cut -d ' ' -f 1)
  killed+=("$current")
  reports+=("$(awk -v id="$current" 'index($0, id) == 1 {found = 1} found && n++ < 12' "$log")")
  next=()
  for index in "${!remaining[@]}"; do
    if [[ ${remaining[index]} == "$current" ]]; then
      next=("${remaining[@]:index+1}")
      break
    fi
  done
  if ((${#next[@]} == 0)) && [[ ${remaining[-1]} != "$current" ]]; then
    echo "sanitize.sh: a sanitizer killed pytest outside a known test (last: $current); stopping" >&2
    status=1
    break
  fi
  remaining=("${next[@]}")
done

echo
echo "==================== sanitize.sh summary ===================="
for index in "${!killed[@]}"; do
  echo "KILLED BY A SANITIZER: ${killed[index]}"
  echo "${reports[index]}"
  echo
done
for test in "${failed[@]}"; do echo "FAILED: $test"; done
echo "sanitize.sh: ${#killed[@]} test(s) killed by a sanitizer, ${#failed[@]} failed"
if ((${#killed[@]} || ${#failed[@]} || (status != 0 && status != 99))); then
  exit 1
fi
echo "sanitize.sh: clean"
