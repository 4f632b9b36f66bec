//! Command line and environment: every option also reads a `TASUKI_*` variable. The
//! server's config file (tokens, limits, container policy, registries) is `server`.

mod copy;
mod queue;
pub mod server;
mod store;
pub mod tokens;

pub use copy::{CopyArgs, LogPlace, StoreCommand};
use queue::AmqpUrlParser;
pub use queue::{QueueOptions, QueueType};
pub use store::{DatabaseUrl, StoreOptions};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "tasuki",
    version = crate::BUILD,
    about = "Run batch jobs as one-shot containers: webhook → queue → Docker → logs → exit status"
)]
pub struct Cli {
    /// Log output format (logs go to stderr).
    #[arg(long, env = "TASUKI_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// Log filter, in tracing's EnvFilter syntax (e.g. `info`, `tasuki=debug`).
    #[arg(long, env = "TASUKI_LOG", default_value = "info", global = true)]
    pub log: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the API server (and, without an AMQP URL, an embedded queue and worker).
    Serve(Box<ServeArgs>),
    /// Run a worker that takes runs from RabbitMQ and reports to a `tasuki serve`.
    Worker(WorkerArgs),
    /// Start a run of JOB; with --wait, stream its output and exit with its exit code.
    Run(RunArgs),
    /// Print a run as JSON.
    Status(StatusArgs),
    /// Print a run's output.
    Logs(LogsArgs),
    /// Cancel a run: a queued one never starts, a running one is stopped.
    Cancel(StatusArgs),
    /// Start a new attempt of a failed, timed-out or lost run.
    Retry(StatusArgs),
    /// Work with job definitions.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Work with stored runs (in the data dir, without a server).
    #[command(subcommand)]
    Runs(RunsCommand),
    /// Work with run stores without a server: copy one into another (from SQLite to
    /// PostgreSQL).
    #[command(subcommand)]
    Store(StoreCommand),
    /// See and steer job schedules on a running server: next fire times, past slots,
    /// pause, resume, backfill.
    #[command(subcommand)]
    Schedules(SchedulesCommand),
    /// Make API and worker tokens.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a new random token: prints its value once, and the lines to paste into the
    /// server's config file (which keeps only its SHA-256).
    Create {
        /// The token's name: logged with every request it makes and stored with every
        /// run it starts.
        #[arg(long, env = "TASUKI_TOKEN_NAME")]
        name: String,
        /// `run:GLOB`, `read:GLOB`, `cancel:GLOB` or `admin`; repeatable.
        #[arg(long = "scope", env = "TASUKI_TOKEN_SCOPES", value_delimiter = ',')]
        scopes: Vec<String>,
        /// A worker token (opens only the worker protocol) instead of an API token.
        #[arg(long, env = "TASUKI_TOKEN_WORKER", conflicts_with = "scopes")]
        worker: bool,
    },
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration `{s}` ({e}); write e.g. 30s, 5m, 1h"))
}

fn default_concurrency() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn default_worker_id() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

/// What every worker (embedded or separate) needs.
#[derive(Debug, Clone, Args)]
pub struct WorkerOptions {
    /// Containers this worker runs at once [default: number of cores].
    #[arg(long, env = "TASUKI_CONCURRENCY")]
    pub concurrency: Option<usize>,

    /// Stable identity of this worker: its containers are labelled with it so a
    /// restarted worker finds its own [default: host name].
    #[arg(long, env = "TASUKI_WORKER_ID")]
    pub worker_id: Option<String>,

    /// Docker engine address (`unix:///var/run/docker.sock`, `tcp://127.0.0.1:2375`)
    /// [default: DOCKER_HOST, else the local socket].
    #[arg(long, env = "TASUKI_DOCKER_HOST")]
    pub docker_host: Option<String>,

    /// On shutdown, how long running containers may go on before the worker exits
    /// and leaves them running.
    #[arg(long, env = "TASUKI_DRAIN_TIMEOUT", value_parser = duration, default_value = "60s")]
    pub drain_timeout: Duration,

    /// How often the worker compares its own containers with the runs it holds (it also
    /// does at start): adopts, finishes, re-queues or removes what differs.
    #[arg(long, env = "TASUKI_RECONCILE_INTERVAL", value_parser = duration, default_value = "60s")]
    pub reconcile_interval: Duration,

    /// Directory for the per-host lock that keeps two live processes from sharing one
    /// worker id [default: /run/lock, else the temp directory]. Every process on a
    /// host must see the same directory (beware of private /tmp).
    #[arg(long, env = "TASUKI_LOCK_DIR")]
    pub lock_dir: Option<PathBuf>,

    /// (benchmark builds only) The container runtime: `docker`, or `noop`, which runs
    /// nothing: each container writes `--noop-output-bytes`, "runs" `--noop-run-for`
    /// and exits 0.
    #[cfg(feature = "bench")]
    #[arg(long, env = "TASUKI_RUNTIME", default_value = "docker",
          value_parser = ["docker", "noop"])]
    pub runtime: String,

    /// (benchmark builds only) How long each `noop` container runs.
    #[cfg(feature = "bench")]
    #[arg(long, env = "TASUKI_NOOP_RUN_FOR", value_parser = duration, default_value = "0s")]
    pub noop_run_for: Duration,

    /// (benchmark builds only) Bytes of output each `noop` container writes.
    #[cfg(feature = "bench")]
    #[arg(long, env = "TASUKI_NOOP_OUTPUT_BYTES", default_value_t = 64)]
    pub noop_output_bytes: usize,
}

impl WorkerOptions {
    pub fn concurrency(&self) -> usize {
        self.concurrency.unwrap_or_else(default_concurrency).max(1)
    }
    pub fn worker_id(&self) -> String {
        self.worker_id
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(default_worker_id)
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "TASUKI_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Directory of job definitions (`*.toml`).
    #[arg(long, env = "TASUKI_JOBS_DIR", default_value = "jobs")]
    pub jobs_dir: PathBuf,

    /// Directory of business calendars (`*.toml`) the jobs' schedules may name
    /// [default: `calendars` beside the jobs directory, if there is one].
    #[arg(long, env = "TASUKI_CALENDARS_DIR")]
    pub calendars_dir: Option<PathBuf>,

    /// Where the logs live, and the run database unless `--database-url` names one.
    #[arg(long, env = "TASUKI_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,

    #[command(flatten)]
    pub store: StoreOptions,

    /// RabbitMQ URL (`amqp://user:pass@host:5672/%2f`); repeated (or comma-separated
    /// in the variable) for the nodes of one cluster, tried in order at every
    /// (re)connect: when the node in use goes away, the next that answers. Without it
    /// runs go through an in-process queue and an embedded worker.
    #[arg(long, env = "TASUKI_AMQP_URL", value_delimiter = ',', value_parser = AmqpUrlParser,
          hide_env_values = true)]
    pub amqp_url: Vec<String>,

    #[command(flatten)]
    pub queue: QueueOptions,

    /// With an AMQP URL, the queue producers publish run requests to
    /// (`{"v":1,"job":...,"params":{...}}`); refused requests go to `{name}.dead`.
    #[arg(long, env = "TASUKI_REQUEST_QUEUE", default_value = "tasuki.requests")]
    pub request_queue: String,

    /// With an AMQP URL, also run a worker inside this process.
    #[arg(long, env = "TASUKI_EMBEDDED_WORKER")]
    pub embedded_worker: bool,

    /// Secret that `tasuki worker` processes present (besides the config file's
    /// `[[worker_tokens]]`); with neither, the worker API is off.
    #[arg(long, env = "TASUKI_WORKER_TOKEN", hide_env_values = true)]
    pub worker_token: Option<String>,

    /// The server config file: API and worker tokens, limits, container policy,
    /// registry credentials (every key is also a `TASUKI_*` variable; see README).
    #[arg(long, env = "TASUKI_CONFIG")]
    pub config: Option<PathBuf>,

    /// Serve a non-loopback address with no API tokens configured: anyone who can
    /// reach it may run, read and cancel every job.
    #[arg(long, env = "TASUKI_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,

    /// TLS certificate chain (PEM); with --tls-key, `serve` speaks HTTPS only.
    #[arg(long, env = "TASUKI_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM) for --tls-cert.
    #[arg(long, env = "TASUKI_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// A worker's claim on a run lasts this long unless renewed.
    #[arg(long, env = "TASUKI_LEASE_TTL", value_parser = duration, default_value = "30s")]
    pub lease_ttl: Duration,

    /// A run still queued this long after its message was published, while the run
    /// queue is empty, has lost its message (queue purged or deleted): publish again.
    #[arg(long, env = "TASUKI_REPUBLISH_AFTER", value_parser = duration, default_value = "5m")]
    pub republish_after: Duration,

    /// Finished runs, with their attempts and logs, are deleted this long after they
    /// ended, and schedule slot records this long after they were recorded (looked for
    /// at start and every 5 minutes); `0` keeps them forever.
    #[arg(long, env = "TASUKI_RETENTION", value_parser = duration, default_value = "30days")]
    pub retention: Duration,

    /// Also write every line runs print, as JSON lines for a log collector, to
    /// `DIR/tasuki-output-YYYY-MM-DD.jsonl` (a file per UTC day).
    #[arg(long, env = "TASUKI_LOG_EXPORT", value_name = "DIR")]
    pub log_export: Option<PathBuf>,

    /// With `--log-export`: a day's file is deleted once it is older than this.
    #[arg(long, env = "TASUKI_LOG_EXPORT_KEEP", value_parser = duration, default_value = "7days")]
    pub log_export_keep: Duration,

    /// Fire job schedules from this process. Several `serve` processes on one store
    /// may all do so: each slot still fires once.
    #[arg(long, env = "TASUKI_SCHEDULER", default_value_t = true, action = clap::ArgAction::Set)]
    pub scheduler: bool,

    /// A schedule slot first seen this long after its fire time was missed (the
    /// scheduler was not running); the schedule's `catch_up` decides what happens to it.
    #[arg(long, env = "TASUKI_SCHEDULE_GRACE", value_parser = duration, default_value = "30s")]
    pub schedule_grace: Duration,

    #[command(flatten)]
    pub callbacks: CallbackOptions,

    #[command(flatten)]
    pub worker: WorkerOptions,
}

/// Completion callbacks (Standard Webhooks).
#[derive(Debug, Args)]
pub struct CallbackOptions {
    /// A signing secret, `whsec_<base64>`; repeat it (or separate by commas) to sign
    /// with several at once while receivers rotate. None: deliveries are unsigned.
    #[arg(long = "callback-secret", env = "TASUKI_CALLBACK_SECRETS", value_delimiter = ',',
          value_parser = secret, hide_env_values = true)]
    pub secrets: Vec<crate::callback::sign::Secret>,

    /// An address range callbacks may reach although it is loopback, private,
    /// link-local or otherwise refused (e.g. 10.1.0.0/16); repeatable.
    #[arg(long = "callback-allow", env = "TASUKI_CALLBACK_ALLOW", value_delimiter = ',',
          value_parser = cidr)]
    pub allow: Vec<crate::domain::callback::guard::Cidr>,

    /// How long after a run's end its callback is still tried.
    #[arg(long = "callback-max-age", env = "TASUKI_CALLBACK_MAX_AGE", value_parser = duration,
          default_value = "24h")]
    pub max_age: Duration,
}

fn secret(s: &str) -> Result<crate::callback::sign::Secret, String> {
    s.parse().map_err(|e| format!("{e}"))
}

fn cidr(s: &str) -> Result<crate::domain::callback::guard::Cidr, String> {
    s.parse().map_err(|e| format!("{e}"))
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The control plane (`tasuki serve`) URL; repeated (or comma-separated in the
    /// variable) for replicas of one installation, asked in order: when one cannot be
    /// reached, the next.
    #[arg(
        long,
        env = "TASUKI_SERVER",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: Vec<String>,

    /// A worker token of the server (`--worker-token`, or one of `[[worker_tokens]]`).
    #[arg(long, env = "TASUKI_WORKER_TOKEN", hide_env_values = true)]
    pub worker_token: String,

    /// CA certificate (PEM) that signed the server's TLS certificate, when it is not
    /// one the system trusts.
    #[arg(long, env = "TASUKI_CA_CERT")]
    pub ca_cert: Option<PathBuf>,

    /// RabbitMQ URL; repeated (or comma-separated in the variable) for the nodes of
    /// one cluster, tried in order at every (re)connect: when the node in use goes
    /// away, the next that answers.
    #[arg(long, env = "TASUKI_AMQP_URL", value_delimiter = ',', value_parser = AmqpUrlParser,
          required = true, hide_env_values = true)]
    pub amqp_url: Vec<String>,

    #[command(flatten)]
    pub queue: QueueOptions,

    #[command(flatten)]
    pub worker: WorkerOptions,

    /// Serve this worker's Prometheus metrics (`/metrics`, and `/healthz`) on this
    /// address, without a token; off when not given. Keep it on loopback or a network
    /// only the scraper reaches.
    #[arg(long, env = "TASUKI_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, Args)]
pub struct ServerOption {
    /// The tasuki server URL.
    #[arg(long, env = "TASUKI_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,

    /// API token (sent as a bearer token).
    #[arg(long, env = "TASUKI_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// CA certificate (PEM) that signed the server's TLS certificate, when it is not
    /// one the system trusts.
    #[arg(long, env = "TASUKI_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Job name.
    pub job: String,

    /// A parameter as NAME=VALUE; repeat for more.
    /// From the environment, TASUKI_PARAMS holds NAME=VALUE lines.
    #[arg(long = "param", short = 'p', value_name = "NAME=VALUE", value_parser = param, env = "TASUKI_PARAMS", value_delimiter = '\n')]
    pub params: Vec<(String, String)>,

    /// Stream the run's output and exit with its exit code (see README for the codes
    /// tasuki uses when the job itself did not decide).
    #[arg(long, env = "TASUKI_WAIT")]
    pub wait: bool,

    /// With --wait, Ctrl-C cancels the run (and waits for it to stop) instead of
    /// detaching from it.
    #[arg(long, env = "TASUKI_CANCEL_ON_INTERRUPT", requires = "wait")]
    pub cancel_on_interrupt: bool,

    #[command(flatten)]
    pub server: ServerOption,
}

fn param(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("`{s}` is not NAME=VALUE")),
    }
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Run id.
    pub run: String,
    #[command(flatten)]
    pub server: ServerOption,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Run id.
    pub run: String,
    /// Keep streaming until the run ends.
    #[arg(long, short = 'f', env = "TASUKI_FOLLOW")]
    pub follow: bool,
    #[command(flatten)]
    pub server: ServerOption,
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Validate every job and calendar file; print each error with file, line and field.
    Check {
        /// Directory of job definitions.
        #[arg(env = "TASUKI_JOBS_DIR", default_value = "jobs")]
        dir: PathBuf,

        /// Directory of business calendars [default: `calendars` beside DIR, if there
        /// is one].
        #[arg(long, env = "TASUKI_CALENDARS_DIR")]
        calendars_dir: Option<PathBuf>,

        /// The server config file whose `[containers]` policy the jobs must keep to
        /// (with `TASUKI_CONTAINERS_*` variables over it, as `serve` reads it)
        /// [default: the built-in policy].
        #[arg(long, env = "TASUKI_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Make a running server read its job and calendar files again (as SIGHUP does);
    /// exit 1 if it refused them (the errors are printed, its jobs stay as they were).
    Reload {
        #[command(flatten)]
        server: ServerOption,
    },
}

/// `JOB` or `JOB/SCHEDULE`.
#[derive(Debug, Clone)]
pub struct ScheduleTarget {
    pub job: String,
    pub schedule: Option<String>,
}

fn schedule_target(s: &str) -> Result<ScheduleTarget, String> {
    let (job, schedule) = match s.split_once('/') {
        Some((job, name)) if !name.is_empty() => (job, Some(name.to_owned())),
        Some(_) => return Err(format!("`{s}`: write JOB or JOB/SCHEDULE")),
        None => (s, None),
    };
    if job.is_empty() {
        return Err(format!("`{s}`: write JOB or JOB/SCHEDULE"));
    }
    Ok(ScheduleTarget {
        job: job.to_owned(),
        schedule,
    })
}

#[derive(Debug, Subcommand)]
pub enum SchedulesCommand {
    /// The next fire times of a job's schedules, in each schedule's zone and in UTC.
    Next {
        /// JOB or JOB/SCHEDULE.
        #[arg(value_parser = schedule_target)]
        target: ScheduleTarget,
        /// How many fire times per schedule.
        #[arg(
            short = 'n',
            long = "count",
            env = "TASUKI_SCHEDULES_COUNT",
            default_value_t = 10
        )]
        count: usize,
        #[command(flatten)]
        server: ServerOption,
    },
    /// Past slots of a job's schedules, newest first: fired (with the run) or skipped
    /// (with the reason).
    Slots {
        /// JOB or JOB/SCHEDULE.
        #[arg(value_parser = schedule_target)]
        target: ScheduleTarget,
        /// How many slots.
        #[arg(long, env = "TASUKI_SLOTS_LIMIT", default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        server: ServerOption,
    },
    /// Pause a schedule (all of the job's without /SCHEDULE); kept across restarts and
    /// reloads. Slots that come due while paused are recorded as skipped (`suspended`).
    Pause {
        /// JOB or JOB/SCHEDULE.
        #[arg(value_parser = schedule_target)]
        target: ScheduleTarget,
        /// Why, for whoever looks later.
        #[arg(long, env = "TASUKI_PAUSE_NOTE")]
        note: Option<String>,
        #[command(flatten)]
        server: ServerOption,
    },
    /// Resume a paused schedule (all of the job's without /SCHEDULE).
    Resume {
        /// JOB or JOB/SCHEDULE.
        #[arg(value_parser = schedule_target)]
        target: ScheduleTarget,
        #[command(flatten)]
        server: ServerOption,
    },
    /// Start one run for every slot of a schedule between --from and --to (fire times,
    /// RFC 3339) that has not fired, oldest first, obeying the job's max_concurrent.
    Backfill {
        /// JOB/SCHEDULE (JOB alone when the job has one schedule).
        #[arg(value_parser = schedule_target)]
        target: ScheduleTarget,
        #[arg(long, env = "TASUKI_BACKFILL_FROM")]
        from: String,
        #[arg(long, env = "TASUKI_BACKFILL_TO")]
        to: String,
        #[command(flatten)]
        server: ServerOption,
    },
}

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// Delete finished runs that ended more than --older-than ago, with their attempts
    /// and logs, and schedule slot records as old (and expired idempotency keys and
    /// spent outbox rows). Works on the data dir directly; safe while `tasuki serve`
    /// runs on it.
    Prune(PruneArgs),
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Delete runs that finished more than this long ago (`0s`: every finished run).
    #[arg(long, env = "TASUKI_PRUNE_OLDER_THAN", value_parser = duration)]
    pub older_than: Duration,

    /// The data dir of the `tasuki serve` whose runs to prune (its logs, and its
    /// database unless `--database-url` names one).
    #[arg(long, env = "TASUKI_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,

    #[command(flatten)]
    pub store: StoreOptions,
}

#[cfg(test)]
mod tests;
