#!/usr/bin/env bash
# The benchmark: tasuki's figures next to their baselines, measured in one run on this
# machine, printed as a table (see README "Performance").
#   benches/run.sh            every section (several minutes on 2 cores)
#   benches/run.sh --quick    shorter loads, fewer samples (a smoke run)
#   benches/run.sh accepts    only the named sections (`--list` names them)
#   TASUKI_BENCH_POSTGRES=postgres://.../postgres benches/run.sh control
#                             the same on PostgreSQL: each `serve` gets a new database
# Sets up what it needs first (a Docker engine, RabbitMQ, the example image), as
# tests/run.sh does, then builds release and runs `cargo bench --bench perf`.
set -euo pipefail
cd "$(dirname "$0")/.."

TASUKI_SETUP_NAME=benches/run.sh
# shellcheck source=tests/setup.sh
source tests/setup.sh

ensure_docker
ensure_rabbitmq
ensure_busybox
export DOCKER="$(docker_cli)"
deploy/example-image/build.sh >&2

exec cargo bench --features bench --bench perf -- "$@"
