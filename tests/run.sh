#!/usr/bin/env bash
# The test command: sets up what the suite needs on a fresh machine, then runs it.
#   - a Docker engine (installs Debian's docker.io and starts dockerd if `docker info` fails)
#   - RabbitMQ on 127.0.0.1:5672 (installs and starts rabbitmq-server if unreachable)
#   - PostgreSQL on 127.0.0.1:5432 (installs and starts it if unreachable) and a test role
#   - the tasuki-example:latest image (static busybox, built locally)
#   - docker-registry and htpasswd (apache2-utils) for the private registry tests
#   - systemd-analyze, docker-compose and kubernetes-validate for the deploy/ checks
#   - promtool (Debian's prometheus package; its server stays stopped) for the metrics tests
#   - schemathesis (PyPI, pinned, in a venv) for the OpenAPI fuzz test
#   - chromium and chromium-driver for the web UI's browser test
#   - the previous build (tests/previous-build), built from this clone's history, for
#     the rolling upgrade test
# and sweeps what a chaos test killed by the runner's time-out left behind,
# then the suite with cargo-nextest (cargo test where nextest is missing), built with the
# `fault-injection` feature (the TASUKI_CRASH_AT crash points the fault tests use) and the
# `bench` feature (the benchmark's no-op runtime, so its tests run too), in two passes:
# all but tests/serial in parallel, then tests/serial one test at a time.
# A last pass builds without the features, as production does, and checks that
# TASUKI_CRASH_AT changes nothing there. Extra arguments go to the runner, in every pass.
set -euo pipefail
cd "$(dirname "$0")/.."

TASUKI_SETUP_NAME=tests/run.sh
# shellcheck source=tests/setup.sh
source tests/setup.sh

ensure_docker
ensure_rabbitmq
ensure_postgres
ensure_socat
ensure_openssl
ensure_chromium
ensure_busybox
ensure_standardwebhooks
ensure_registry
ensure_deploy_tools
ensure_promtool
ensure_schemathesis
ensure_previous_build
sweep_chaos_leftovers
export DOCKER="$(docker_cli)"
deploy/example-image/build.sh >&2

# Pass 1: everything but the `serial` test binary, in parallel. Pass 2: the fault tests
# that stop or reconfigure the shared RabbitMQ and Docker engine, one at a time, with
# nothing else running against them. Pass 3: the production build. Every pass runs even
# when an earlier one failed; the script fails if any did.
features=(--features fault-injection,bench)
production_check=production_build_ignores_tasuki_crash_at
status=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run "${features[@]}" --workspace --no-fail-fast -E 'not binary(serial)' "$@" || status=1
  log "pass 2: serial fault tests"
  cargo nextest run "${features[@]}" --no-fail-fast --test serial --test-threads 1 --no-tests warn "$@" || status=1
  log "pass 3: the production build ignores TASUKI_CRASH_AT"
  cargo nextest run --no-fail-fast --test e2e -E "test($production_check)" "$@" || status=1
else
  # cargo test has no "all test targets but one": name them.
  targets=()
  for f in tests/*.rs tests/*/main.rs; do
    [ -e "$f" ] || continue
    name=$(basename "${f%/main.rs}" .rs)
    [ "$name" = serial ] || targets+=(--test "$name")
  done
  cargo test "${features[@]}" --workspace --no-fail-fast --lib --bins "${targets[@]}" "$@" || status=1
  log "pass 2: serial fault tests"
  RUST_TEST_THREADS=1 cargo test "${features[@]}" --no-fail-fast --test serial "$@" || status=1
  log "pass 3: the production build ignores TASUKI_CRASH_AT"
  cargo test --no-fail-fast --test e2e "$@" -- "$production_check" || status=1
fi
exit "$status"
