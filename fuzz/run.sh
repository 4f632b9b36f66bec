#!/usr/bin/env bash
# Fuzz every parser of outside input for a bounded time, on the stable toolchain.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#
# First every target runs once over its committed corpus (fuzz/corpus/<target>: the
# regression check), then each is fuzzed for SECONDS_PER_TARGET (default 60; 0 = the
# regression check only), one at a time. New inputs go to fuzz/target/corpus/<target>,
# never into the committed corpus; a crash, a hang (over 10 s for one input), running
# out of memory (over 2 GiB) or a failed property check is written to
# fuzz/artifacts/<target>/ and makes the script exit 1 once every target has run.
#
# Stable Rust: `--sanitizer none` needs no `-Z` flag (libFuzzer's coverage comes from
# `-Cpasses=sancov-module`, a stable codegen option). The targets are safe Rust, so
# AddressSanitizer would add little; overflow checks and debug assertions stay on.
set -euo pipefail

cd "$(dirname "$0")"
# The fuzz build (instrumented, its own workspace) stays in fuzz/target, whatever the
# main crate's CARGO_TARGET_DIR is.
export CARGO_TARGET_DIR="$PWD/target"
seconds="${1:-60}"
shift || true
all=(job_file resolve_params create_run_body queue_messages log_frames)
if [ "$#" -gt 0 ]; then targets=("$@"); else targets=("${all[@]}"); fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

flags=(--sanitizer none)
cargo fuzz build "${flags[@]}"

dict_for() {
    case "$1" in
        job_file) echo "-dict=dict/job_file.dict" ;;
        create_run_body | queue_messages) echo "-dict=dict/json.dict" ;;
        *) echo "" ;;
    esac
}

libfuzzer=(-timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    echo "== $t: the committed corpus" >&2
    if ! cargo fuzz run "${flags[@]}" "$t" "corpus/$t" -- "${libfuzzer[@]}" -runs=0; then
        failed+=("$t (corpus)")
        continue
    fi
    if [ "$seconds" -gt 0 ]; then
        work="target/corpus/$t"
        mkdir -p "$work"
        echo "== $t: fuzzing for ${seconds}s" >&2
        # shellcheck disable=SC2046 # an empty dictionary flag is no argument
        if ! cargo fuzz run "${flags[@]}" "$t" "$work" "corpus/$t" -- \
            "${libfuzzer[@]}" -max_total_time="$seconds" $(dict_for "$t"); then
            failed+=("$t")
        fi
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzzing found problems in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzzing found nothing: ${targets[*]}" >&2
