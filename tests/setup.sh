# Set-up steps shared by tests/run.sh and benches/run.sh: each `ensure_*` installs and
# starts what is missing (Debian packages, dockerd, RabbitMQ, pinned PyPI tools) and
# returns at once when it is there. Sourced, not run.
log() { echo "${TASUKI_SETUP_NAME:-setup}: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then as_root apt-get update -q >/dev/null; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q "$@" >/dev/null
}

# Prefer Debian's client (it matches the engine), else whatever is on PATH.
docker_cli() { if [ -x /usr/bin/docker ]; then echo /usr/bin/docker; else command -v docker || echo docker; fi; }

ensure_docker() {
  if "$(docker_cli)" info >/dev/null 2>&1; then return; fi
  if [ ! -x /usr/sbin/dockerd ] && ! command -v dockerd >/dev/null 2>&1; then
    log "installing docker.io"
    apt_install docker.io
  fi
  log "starting dockerd (log: /var/log/tasuki-dockerd.log)"
  as_root sh -c 'setsid -f nohup "$(command -v dockerd || echo /usr/sbin/dockerd)" >/var/log/tasuki-dockerd.log 2>&1 </dev/null'
  for _ in $(seq 1 60); do
    if "$(docker_cli)" info >/dev/null 2>&1; then return; fi
    sleep 1
  done
  log "dockerd did not come up; last lines of its log:"
  tail -n 20 /var/log/tasuki-dockerd.log >&2 || true
  exit 1
}

amqp_reachable() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

ensure_rabbitmq() {
  if [ -n "${TASUKI_TEST_AMQP_URL:-}" ]; then return; fi   # someone else's broker
  if amqp_reachable; then return; fi
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    log "installing rabbitmq-server"
    apt_install rabbitmq-server
  fi
  log "starting rabbitmq-server"
  as_root rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 90); do
    if amqp_reachable; then return; fi
    sleep 1
  done
  log "RabbitMQ is not reachable on 127.0.0.1:5672"
  exit 1
}

# PostgreSQL for the PostgreSQL store's tests: a server on 127.0.0.1:5432 (Debian's
# package, installed and started when nothing answers there), and a role of the tests'
# own that may create databases (each test makes one and drops it), made through the
# local socket as the `postgres` user, so it works whatever the server's TCP auth is.
# TASUKI_TEST_POSTGRES names the maintenance database URL the tests connect to.
pg_reachable() { (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }
ensure_postgres() {
  # The chaos tests start PostgreSQL instances of their own with initdb and pg_ctl.
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    log "installing postgresql (initdb for the chaos tests)"
    apt_install postgresql
  fi
  if [ -n "${TASUKI_TEST_POSTGRES:-}" ]; then return; fi   # someone else's server
  if ! pg_reachable; then
    if ! command -v pg_ctlcluster >/dev/null 2>&1; then
      log "installing postgresql"
      apt_install postgresql
    fi
    log "starting PostgreSQL"
    as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main start || true
    for _ in $(seq 1 60); do
      if pg_reachable; then break; fi
      sleep 1
    done
    if ! pg_reachable; then log "PostgreSQL is not reachable on 127.0.0.1:5432"; exit 1; fi
  fi
  as_root runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 -d postgres -c "DO \$\$ BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tasuki_test') THEN
        CREATE ROLE tasuki_test LOGIN CREATEDB PASSWORD 'tasuki_test';
      END IF;
    END \$\$;" >/dev/null
  export TASUKI_TEST_POSTGRES=postgres://tasuki_test:tasuki_test@127.0.0.1:5432/postgres
}

ensure_busybox() {
  if [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; then return; fi
  log "installing busybox-static"
  apt_install busybox-static
}

# The callback and inbound-webhook tests check signatures with an implementation that is
# not ours: the Python `standardwebhooks` package.
ensure_standardwebhooks() {
  if python3 -c 'import standardwebhooks' 2>/dev/null; then return; fi
  log "installing the Python package standardwebhooks"
  python3 -m pip install --quiet standardwebhooks
}

# The private registry tests run their own `docker-registry serve` (htpasswd auth, made
# with apache2-utils' htpasswd) on a free port; the package's service is never started:
# while it installs, a policy-rc.d (if there is none) keeps invoke-rc.d from starting it,
# and systemd is told to leave it disabled.
ensure_registry() {
  if command -v docker-registry >/dev/null 2>&1 && command -v htpasswd >/dev/null 2>&1; then return; fi
  log "installing docker-registry and apache2-utils (the registry service stays stopped)"
  local policy=/usr/sbin/policy-rc.d made_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod +x "$policy"
    made_policy=1
  fi
  local installed=0
  apt_install docker-registry apache2-utils || installed=$?
  if [ -n "$made_policy" ]; then as_root rm -f "$policy"; fi
  if [ -d /run/systemd/system ]; then as_root systemctl disable --now docker-registry >/dev/null 2>&1 || true; fi
  return "$installed"
}

# The TLS tests make a private CA and a server certificate with the openssl command.
ensure_openssl() {
  if command -v openssl >/dev/null 2>&1; then return; fi
  log "installing openssl"
  apt_install openssl
}

# The deploy tests (tests/e2e/deploy.rs) check deploy/ with real validators:
# systemd-analyze (systemd), docker-compose (Debian's 1.29, as Docker's own CLI here has no
# compose plugin) and kubernetes-validate, which bundles the Kubernetes schemas, in a venv
# of its own with PyYAML. Other installers may hold the dpkg lock: wait for it.
deploy_venv=/opt/tasuki-venv-deploy
ensure_deploy_tools() {
  local missing=()
  [ -x /usr/bin/systemd-analyze ] || missing+=(systemd)
  [ -x /usr/bin/docker-compose ] || missing+=(docker-compose)
  [ -x /usr/bin/curl ] || missing+=(curl)
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt_install -o DPkg::Lock::Timeout=600 "${missing[@]}"
  fi
  if [ -x "$deploy_venv/bin/kubernetes-validate" ] && "$deploy_venv/bin/python" -c 'import yaml' 2>/dev/null; then return; fi
  log "installing kubernetes-validate in $deploy_venv"
  if ! python3 -m venv "$deploy_venv" >/dev/null 2>&1; then
    apt_install -o DPkg::Lock::Timeout=600 python3-venv
    python3 -m venv "$deploy_venv"
  fi
  "$deploy_venv/bin/pip" install --quiet kubernetes-validate pyyaml
}

# The metrics tests check the exposition (`promtool check metrics`) and the example
# alert rules (`promtool check rules`) with Prometheus' own tool. Debian ships it in the
# prometheus package, whose server must not start here: a policy-rc.d (if there is none)
# keeps invoke-rc.d from starting it, and systemd is told to leave it disabled. Other
# installs may hold the dpkg lock meanwhile, hence the lock timeout.
ensure_promtool() {
  if command -v promtool >/dev/null 2>&1; then return; fi
  log "installing promtool (Debian's prometheus package; the server stays stopped)"
  local policy=/usr/sbin/policy-rc.d made_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod +x "$policy"
    made_policy=1
  fi
  if [ -z "$apt_updated" ]; then as_root apt-get update -q >/dev/null; apt_updated=1; fi
  local installed=0
  DEBIAN_FRONTEND=noninteractive as_root apt-get -o DPkg::Lock::Timeout=600 install -y -q \
    --no-install-recommends prometheus >/dev/null || installed=$?
  if [ -n "$made_policy" ]; then as_root rm -f "$policy"; fi
  if [ -d /run/systemd/system ]; then as_root systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
  return "$installed"
}

# The OpenAPI test runs schemathesis against a live `serve`; it finds it through
# TASUKI_SCHEMATHESIS. Pinned, in its own venv, so its dependencies meet nothing else.
SCHEMATHESIS_VERSION=4.32.5
SCHEMATHESIS_VENV=/opt/tasuki-venv-openapi
ensure_schemathesis() {
  local bin="$SCHEMATHESIS_VENV/bin/schemathesis"
  if [ -x "$bin" ] && "$SCHEMATHESIS_VENV/bin/pip" show schemathesis 2>/dev/null | grep -qx "Version: $SCHEMATHESIS_VERSION"; then
    export TASUKI_SCHEMATHESIS="$bin"
    return
  fi
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    log "installing python3-venv"
    apt_install python3-venv
  fi
  log "installing schemathesis $SCHEMATHESIS_VERSION into $SCHEMATHESIS_VENV"
  if [ ! -w "$(dirname "$SCHEMATHESIS_VENV")" ] && [ ! -w "$SCHEMATHESIS_VENV" ]; then
    as_root mkdir -p "$SCHEMATHESIS_VENV"
    as_root chown "$(id -u):$(id -g)" "$SCHEMATHESIS_VENV"
  fi
  python3 -m venv "$SCHEMATHESIS_VENV"
  "$SCHEMATHESIS_VENV/bin/pip" install --quiet "schemathesis==$SCHEMATHESIS_VERSION"
  export TASUKI_SCHEMATHESIS="$bin"
}

# The web UI test drives Debian's Chromium headless through chromedriver. Other jobs
# on the machine may hold the dpkg lock: wait for it rather than fail.
ensure_chromium() {
  if [ -x /usr/bin/chromedriver ] && [ -x /usr/bin/chromium ]; then return; fi
  log "installing chromium and chromium-driver"
  if [ -z "$apt_updated" ]; then as_root apt-get update -q >/dev/null; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get -o DPkg::Lock::Timeout=600 install -y -q \
    --no-install-recommends chromium chromium-driver >/dev/null
}

# The network namespace chaos tests (tests/serial/netns/) bridge RabbitMQ and each
# replica's API in and out of their namespaces with socat, and make the namespaces with
# iproute2's ip (and look at listeners with its ss).
ensure_socat() {
  local missing=()
  command -v socat >/dev/null 2>&1 || missing+=(socat)
  command -v ip >/dev/null 2>&1 && command -v ss >/dev/null 2>&1 || missing+=(iproute2)
  if [ "${#missing[@]}" -eq 0 ]; then return; fi
  log "installing ${missing[*]}"
  apt_install -o DPkg::Lock::Timeout=600 "${missing[@]}"
}

# The previous build, for the rolling upgrade test (tests/serial/netns/upgrade.rs): the
# commit that tests/previous-build names, taken from this clone's history with `git
# archive` and built from its own sources, with the features the tests build with, in a
# target dir of its own (cargo keys a workspace's own crate by its path relative to the
# workspace, so two checkouts sharing one target dir would pass for each other). The
# binary is kept as target/previous/tasuki-COMMIT, built once per commit, and the build
# dir removed; TASUKI_PREVIOUS_BIN names the binary.
ensure_previous_build() {
  local repo commit bin src
  repo=$(pwd)
  commit=$(grep -v '^#' tests/previous-build | tr -d '[:space:]')
  bin="$repo/target/previous/tasuki-$commit"
  export TASUKI_PREVIOUS_COMMIT="$commit" TASUKI_PREVIOUS_BIN="$bin"
  if [ -x "$bin" ]; then return; fi
  if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
    log "the previous build $commit is not in this clone; fetching it from origin"
    git fetch -q origin "$commit" 2>/dev/null || git fetch -q --unshallow origin || {
      log "cannot get commit $commit (tests/previous-build)"
      exit 1
    }
  fi
  src=$(mktemp -d /tmp/tasuki-previous.XXXXXX)
  git archive "$commit" | tar -x -C "$src"
  log "building the previous build ${commit:0:12} (for the rolling upgrade test)"
  mkdir -p "$repo/target/previous"
  if ! (cd "$src" && CARGO_TARGET_DIR="$repo/target/previous/build" \
        TASUKI_BUILD_COMMIT="$commit" \
        cargo build -q --locked --features fault-injection,bench --bin tasuki); then
    rm -rf "$src"
    log "the previous build $commit does not build"
    exit 1
  fi
  cp "$repo/target/previous/build/debug/tasuki" "$bin.part"
  mv "$bin.part" "$bin"
  rm -rf "$src" "$repo/target/previous/build"
}

# What a chaos test leaves when the runner kills it on its own time-out, before its Drop
# runs: namespaces named tsk-PID-... and PostgreSQL instances in $TMPDIR/tsk-pg-PID-...
# (tests/serial/netns/), RabbitMQ nodes with their directories in
# $TMPDIR/tsk-rabbit-PID-... (tests/serial/rabbit_cluster.rs), PID being the test
# process. Only those whose test process is gone are swept: the processes inside such a
# namespace (the test's own replicas, workers and helpers) are killed by PID and the
# namespace deleted; a PostgreSQL instance is stopped with pg_ctl on its own data
# directory; a RabbitMQ node's VM is killed by the PID in its own pid file; then the
# directory is removed.
sweep_chaos_leftovers() {
  local ns pid dir pg_ctl vm
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^tsk-[0-9]+-' || true); do
    pid=${ns#tsk-}; pid=${pid%%-*}
    if kill -0 "$pid" 2>/dev/null; then continue; fi
    log "sweeping namespace $ns, left by test process $pid"
    for p in $(ip netns pids "$ns" 2>/dev/null); do as_root kill -KILL "$p" 2>/dev/null || true; done
    as_root ip netns del "$ns" 2>/dev/null || true
  done
  pg_ctl=$(ls /usr/lib/postgresql/*/bin/pg_ctl 2>/dev/null | sort -V | tail -1)
  for dir in "${TMPDIR:-/tmp}"/tsk-pg-*; do
    [ -d "$dir" ] || continue
    pid=${dir##*/tsk-pg-}; pid=${pid%%-*}
    if kill -0 "$pid" 2>/dev/null; then continue; fi
    log "sweeping PostgreSQL instance $dir, left by test process $pid"
    if [ -n "$pg_ctl" ] && [ -f "$dir/data/postmaster.pid" ]; then
      as_root runuser -u postgres -- "$pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    as_root rm -rf "$dir"
  done
  for dir in "${TMPDIR:-/tmp}"/tsk-rabbit-*; do
    [ -d "$dir" ] || continue
    pid=${dir##*/tsk-rabbit-}; pid=${pid%%-*}
    if kill -0 "$pid" 2>/dev/null; then continue; fi
    log "sweeping RabbitMQ nodes in $dir, left by test process $pid"
    for vm in $(cat "$dir"/*/pid 2>/dev/null); do
      as_root kill -KILL "$vm" 2>/dev/null || true
    done
    as_root rm -rf "$dir"
  done
}
