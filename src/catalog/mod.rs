//! The job catalog: one TOML file per job in a directory, turned into [`JobSpec`]s,
//! and the business calendars their schedules use (`calendars`, `datelist`).
//!
//! Loading lives here; the file-format structs (`file`) and the validators, one per
//! section of a job file (`validate`), are private to this module; `reload` swaps a
//! newly loaded set in while the process runs. Every validation error names the file,
//! the 1-based line (when known) and the field.

mod calendars;
mod datelist;
mod file;
mod reload;
mod validate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::domain::job::{ContainerPolicy, Hardening, JobName, JobSpec};
use crate::domain::job_lookup::JobLookup;
pub use crate::domain::job_lookup::{CatalogError, CatalogErrors};
use crate::domain::schedule::Calendar;
use calendars::CalendarSet;
pub use calendars::{Calendars, CalendarsDir};
use file::JobFile;
pub use reload::Reloadable;
use validate::Ctx;
pub use validate::WEEKDAYS_CALENDAR;

/// Where a catalog is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogDirs {
    pub jobs: PathBuf,
    pub calendars: CalendarsDir,
}

impl CatalogDirs {
    /// The jobs directory, and `calendars_dir` or else `calendars` beside it.
    pub fn new(jobs: impl Into<PathBuf>, calendars_dir: Option<PathBuf>) -> CatalogDirs {
        let jobs = jobs.into();
        let calendars = CalendarsDir::for_jobs_dir(&jobs, calendars_dir);
        CatalogDirs { jobs, calendars }
    }
}

/// What a job was built from, to tell on reload whether it changed: its file, the
/// calendars its schedules use, and its hardening (a mount's source is resolved on the
/// host, which may change under the same text).
#[derive(Debug, Clone, PartialEq, Eq)]
struct JobSource {
    text: String,
    calendars: Vec<Calendar>,
    hardening: Hardening,
}

/// The loaded jobs, keyed and iterated by name, and the calendars they may use.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    jobs: BTreeMap<JobName, Arc<JobSpec>>,
    calendars: Calendars,
    sources: BTreeMap<JobName, JobSource>,
}

impl Catalog {
    /// Load the calendars, then every job, each within the server's container policy.
    /// All errors from all files are collected; any error fails the whole load.
    pub fn load(dirs: &CatalogDirs, policy: &ContainerPolicy) -> Result<Catalog, CatalogErrors> {
        let set = calendars::load(&dirs.calendars);
        Self::load_jobs(&dirs.jobs, set, policy)
    }

    /// Load the jobs of `dir` without calendars (a job naming one is an error), under
    /// the default container policy.
    pub fn load_dir(dir: &Path) -> Result<Catalog, CatalogErrors> {
        Self::load_jobs(dir, CalendarSet::default(), &ContainerPolicy::default())
    }

    /// Every `*.toml` file directly inside `dir` (not recursive). Other files,
    /// sub-directories and dot-files (editor lock/backup files) are ignored.
    fn load_jobs(
        dir: &Path,
        set: CalendarSet,
        policy: &ContainerPolicy,
    ) -> Result<Catalog, CatalogErrors> {
        let mut errors = set.errors.clone();
        let files = match toml_files(dir, "job directory") {
            Ok(files) => files,
            Err(e) => {
                errors.push(e);
                return Err(CatalogErrors(errors));
            }
        };
        let mut jobs = BTreeMap::new();
        let mut sources = BTreeMap::new();
        for path in files {
            // A non-UTF-8 stem becomes an invalid job name (reported), not a silent skip.
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let text = match read_text(&path) {
                Ok(text) => text,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            match parse_job_in(&stem, &path, &text, &set, policy) {
                Ok(spec) => {
                    let source = JobSource {
                        calendars: spec
                            .schedules
                            .iter()
                            .filter_map(|s| s.calendar.as_deref().cloned())
                            .collect(),
                        hardening: spec.hardening.clone(),
                        text,
                    };
                    sources.insert(spec.name.clone(), source);
                    jobs.insert(spec.name.clone(), Arc::new(spec));
                }
                Err(errs) => errors.extend(errs),
            }
        }
        if errors.is_empty() {
            Ok(Catalog {
                jobs,
                calendars: set.calendars,
                sources,
            })
        } else {
            Err(CatalogErrors(errors))
        }
    }

    /// Build a catalog from already-validated specs (later duplicates win).
    pub fn from_specs(specs: impl IntoIterator<Item = JobSpec>) -> Catalog {
        Catalog {
            jobs: specs
                .into_iter()
                .map(|s| (s.name.clone(), Arc::new(s)))
                .collect(),
            ..Catalog::default()
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<JobSpec>> {
        self.jobs.get(name).cloned()
    }

    /// Jobs sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<JobSpec>> {
        self.jobs.values()
    }

    /// Job names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &JobName> {
        self.jobs.keys()
    }

    /// The calendars, sorted by name (those no job uses too).
    pub fn calendars(&self) -> &Calendars {
        &self.calendars
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Did `name` change between `self` and `newer`? A job without a recorded source
    /// (built by [`Catalog::from_specs`]) always counts as changed.
    fn changed(&self, newer: &Catalog, name: &JobName) -> bool {
        match (self.sources.get(name), newer.sources.get(name)) {
            (Some(a), Some(b)) => a != b,
            _ => true,
        }
    }
}

impl JobLookup for Catalog {
    fn job(&self, name: &str) -> Option<Arc<JobSpec>> {
        self.get(name)
    }

    fn jobs(&self) -> Vec<Arc<JobSpec>> {
        self.iter().cloned().collect()
    }
}

/// The `*.toml` files directly in `dir`, sorted; dot-files and directories skipped.
fn toml_files(dir: &Path, what: &str) -> Result<Vec<PathBuf>, CatalogError> {
    let dir_error = |e: std::io::Error| CatalogError {
        file: dir.to_path_buf(),
        line: None,
        field: None,
        message: format!("cannot read {what}: {e}"),
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(dir_error)? {
        let entry = entry.map_err(dir_error)?;
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.')
            || path.extension().is_none_or(|ext| ext != "toml")
        {
            continue;
        }
        // Follows symlinks; a dangling link is reported when reading it.
        if path.is_dir() {
            continue;
        }
        files.push(path);
    }
    files.sort();
    Ok(files)
}

/// A file's text, which must be UTF-8.
fn read_text(path: &Path) -> Result<String, CatalogError> {
    let file_error = |message: String| CatalogError {
        file: path.to_path_buf(),
        line: None,
        field: None,
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| file_error(format!("cannot read file: {e}")))?;
    String::from_utf8(bytes).map_err(|_| file_error("file is not valid UTF-8".to_owned()))
}

/// Parse and validate one job file without calendars, under the default container
/// policy. `name` is the file stem, `file` is used in errors.
pub fn parse_job(name: &str, file: &Path, text: &str) -> Result<JobSpec, Vec<CatalogError>> {
    parse_job_in(
        name,
        file,
        text,
        &CalendarSet::default(),
        &ContainerPolicy::default(),
    )
}

/// Parse and validate one job's text as `tasuki jobs check` would with `calendars` in
/// the calendars directory: `name` is the file stem, and errors name `jobs/{name}.toml`.
/// The fuzz targets' way in (`fuzz/fuzz_targets/job_file.rs`).
pub fn parse_job_str(
    name: &str,
    text: &str,
    calendars: &[Calendar],
    policy: &ContainerPolicy,
) -> Result<JobSpec, Vec<CatalogError>> {
    let set = CalendarSet {
        calendars: calendars
            .iter()
            .map(|c| (c.name.clone(), Arc::new(c.clone())))
            .collect(),
        ..CalendarSet::default()
    };
    let file = PathBuf::from(format!("jobs/{name}.toml"));
    parse_job_in(name, &file, text, &set, policy)
}

fn parse_job_in(
    name: &str,
    file: &Path,
    text: &str,
    calendars: &CalendarSet,
    policy: &ContainerPolicy,
) -> Result<JobSpec, Vec<CatalogError>> {
    let mut ctx = Ctx::new(file, text);
    let job_name = match JobName::parse(name) {
        Ok(n) => Some(n),
        Err(e) => {
            ctx.file_error(
                None,
                format!("{e} (the job name is the file name without `.toml`)"),
            );
            None
        }
    };

    let raw: JobFile = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            ctx.toml_error(&e);
            return Err(ctx.errors);
        }
    };

    let spec = validate::validate(&mut ctx, job_name, &raw, calendars, policy);
    match spec {
        Some(spec) if ctx.errors.is_empty() => Ok(spec),
        _ => Err(ctx.errors),
    }
}

/// Best-effort field path for a TOML parse/deserialize error at `line`: the key on
/// that line, prefixed by the nearest `[table]` header above it; an `[[array]]` table
/// header counts as `array[i]`, `i` being how many of its kind come before it.
fn field_at_line(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let idx = line.checked_sub(1)?;
    let here = lines.get(idx)?.trim();
    let array_name = |l: &str| -> Option<String> {
        let inner = l.trim().strip_prefix("[[")?.split("]]").next()?.trim();
        (!inner.is_empty()).then(|| inner.replace([' ', '"'], ""))
    };
    let header = |i: usize| -> Option<String> {
        let l = lines[i].trim();
        if let Some(name) = array_name(l) {
            let before = lines[..i]
                .iter()
                .filter(|l| array_name(l).as_ref() == Some(&name))
                .count();
            return Some(format!("{name}[{before}]"));
        }
        let inner = l.strip_prefix('[')?.split(']').next()?.trim();
        (!inner.is_empty()).then(|| inner.replace([' ', '"'], ""))
    };
    if let Some(h) = header(idx) {
        return Some(h);
    }
    let key = here
        .split_once('=')
        .map(|(k, _)| k.trim().replace([' ', '"'], ""))
        .filter(|k| !k.is_empty() && !k.contains('#'));
    let table = (0..idx).rev().find_map(header);
    match (table, key) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (None, Some(k)) => Some(k),
        (Some(t), None) => Some(t),
        (None, None) => None,
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Parsing a snippet as `jobs/hello.toml`, for the validators' tests.
    use super::*;

    pub fn parse(text: &str) -> Result<JobSpec, Vec<CatalogError>> {
        parse_job("hello", Path::new("jobs/hello.toml"), text)
    }

    /// As [`parse`], with these calendars known.
    pub fn parse_with(text: &str, calendars: &[Calendar]) -> Result<JobSpec, Vec<CatalogError>> {
        parse_job_str("hello", text, calendars, &ContainerPolicy::default())
    }

    /// As [`parse`], under this container policy.
    pub fn parse_under(text: &str, policy: &ContainerPolicy) -> Result<JobSpec, Vec<CatalogError>> {
        parse_job_str("hello", text, &[], policy)
    }

    pub fn errors(text: &str) -> Vec<String> {
        parse(text)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    pub fn one_error(text: &str) -> CatalogError {
        let mut errs = parse(text).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        errs.remove(0)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::domain::job::{PullPolicy, Resources};
    use std::fs;
    use std::time::Duration;

    const FULL: &str = r#"
description = "Say hello"
image = "tasuki-example:latest"
command = ["sh", "-c", "echo {{params.name}} {{ params.punct }}"]
workdir = "/tmp"
user = "1000:1000"
pull = "always"
timeout = "30m"
stop_grace = "5s"
network = "none"
max_concurrent = 2

[[schedules]]
name = "morning"
cron = "0 9 * * 1-5"
time_zone = "Asia/Tokyo"
params = { punct = "!" }

[env]
FOO = "bar"
GREETING = "hi {{params.name}}"

[resources]
cpu = 512
cpu_limit = 0.5
memory = "256MiB"

[params.name]
default = "world"
pattern = "[a-z]+"
max_length = 64
description = "who to greet"

[params.punct]
required = true
"#;
    #[test]
    fn full_file() {
        let s = parse(FULL).unwrap();
        assert_eq!(s.name.as_str(), "hello");
        assert_eq!(s.description.as_deref(), Some("Say hello"));
        assert_eq!(s.image, "tasuki-example:latest");
        assert_eq!(s.command.len(), 3);
        assert_eq!(s.workdir.as_deref(), Some("/tmp"));
        assert_eq!(s.user.as_deref(), Some("1000:1000"));
        assert_eq!(s.pull, PullPolicy::Always);
        assert_eq!(s.timeout, Some(Duration::from_secs(1800)));
        assert_eq!(s.stop_grace, Duration::from_secs(5));
        assert_eq!(s.network, "none");
        assert_eq!(s.schedules.len(), 1);
        let sched = &s.schedules[0];
        assert_eq!(sched.name, "morning");
        assert_eq!(sched.params["punct"], "!");
        assert_eq!(s.max_concurrent, Some(2));
        match &sched.rule {
            crate::domain::schedule::Rule::Cron(c) => assert_eq!(c.expression, "0 9 * * 1-5"),
            other => panic!("{other:?}"),
        }
        assert_eq!(sched.time_zone, chrono_tz::Asia::Tokyo);
        assert_eq!(s.env["FOO"], "bar");
        assert_eq!(
            s.resources,
            Resources {
                cpu: Some(512),
                cpu_limit: Some(0.5),
                memory_bytes: Some(256 << 20)
            }
        );
        let name = &s.params["name"];
        assert!(!name.required);
        assert_eq!(name.default.as_deref(), Some("world"));
        assert_eq!(name.max_length, 64);
        assert_eq!(name.description.as_deref(), Some("who to greet"));
        assert!(s.params["punct"].required);
        assert_eq!(s.params["punct"].max_length, 1024);

        let given = BTreeMap::from([("punct".to_owned(), "!".to_owned())]);
        let r = s.resolve(&given).unwrap();
        assert_eq!(r.command[2], "echo world !");
        assert_eq!(r.env["GREETING"], "hi world");
    }

    #[test]
    fn minimal_file_defaults() {
        let s = parse(r#"image = "alpine""#).unwrap();
        assert!(s.command.is_empty());
        assert_eq!(s.pull, PullPolicy::IfNotPresent);
        assert_eq!(s.stop_grace, Duration::from_secs(10));
        assert_eq!(s.network, "bridge");
        assert_eq!(s.timeout, None);
        let memory = Some(crate::domain::job::DEFAULT_MEMORY); // the server's default
        assert_eq!(s.resources.memory_bytes, memory);
        assert_eq!((s.resources.cpu, s.resources.cpu_limit), (None, None));
        assert!(s.params.is_empty() && s.env.is_empty() && s.schedules.is_empty());
    }

    #[test]
    fn unknown_field_with_line() {
        let e = one_error("image = \"a\"\n\nimgae = \"b\"\n");
        assert_eq!(e.line, Some(3));
        assert_eq!(e.field.as_deref(), Some("imgae"));
        assert!(e.message.contains("unknown field `imgae`"), "{e}");

        let e = one_error("image = \"a\"\n[resources]\ncpu = 512\nmem = \"1GiB\"\n");
        assert_eq!(e.line, Some(4));
        assert_eq!(e.field.as_deref(), Some("resources.mem"));

        let e = one_error("image = \"a\"\n[params.x]\nrequired = true\nregex = \"a\"\n");
        assert_eq!(e.line, Some(4));
        assert_eq!(e.field.as_deref(), Some("params.x.regex"));
    }

    #[test]
    fn wrong_type_and_syntax_errors() {
        let e = one_error("image = \"a\"\n[resources]\ncpu = \"lots\"\n");
        assert_eq!(e.line, Some(3));
        assert_eq!(e.field.as_deref(), Some("resources.cpu"));
        let e = one_error("image = \"a\"\n[env]\nN = 5\n");
        assert_eq!(e.line, Some(3));
        assert_eq!(e.field.as_deref(), Some("env.N"));
        let e = one_error("image = \"a\"\ncommand = [\"a\",\n");
        assert!(e.line.is_some());
        assert!(!e.message.contains('\n'));
    }

    #[test]
    fn bad_job_name_from_stem() {
        let errs =
            parse_job("Bad.Name", Path::new("jobs/Bad.Name.toml"), "image = \"a\"").unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, None);
        assert!(
            errs[0]
                .to_string()
                .starts_with("jobs/Bad.Name.toml: invalid job name \"Bad.Name\"")
        );
    }

    #[test]
    fn collects_multiple_errors_per_file() {
        let errs =
            errors("image = \"a\"\ntimeout = \"x\"\npull = \"y\"\n[resources]\nmemory = \"z\"\n");
        assert_eq!(errs.len(), 3, "{errs:?}");
    }

    #[test]
    fn load_dir_ok_and_sorted() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("b.toml"), "image = \"b\"").unwrap();
        fs::write(dir.path().join("a.toml"), "image = \"a\"").unwrap();
        fs::write(dir.path().join("README.md"), "not a job").unwrap();
        fs::write(dir.path().join(".#a.toml"), "garbage").unwrap();
        fs::create_dir(dir.path().join("sub.toml")).unwrap();
        fs::create_dir(dir.path().join("nested")).unwrap();
        fs::write(dir.path().join("nested/c.toml"), "image = \"c\"").unwrap();
        let c = Catalog::load_dir(dir.path()).unwrap();
        assert_eq!(c.len(), 2);
        assert!(!c.is_empty());
        let names: Vec<&str> = c.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(c.get("b").unwrap().image, "b");
        assert!(c.get("c").is_none());
    }

    #[test]
    fn load_dir_collects_all_errors() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("good.toml"), "image = \"g\"").unwrap();
        fs::write(dir.path().join("Bad.toml"), "image = \"g\"").unwrap();
        fs::write(dir.path().join("x.toml"), "image = \"g\"\nbogus = 1\n").unwrap();
        fs::write(dir.path().join("y.toml"), [0xff, 0xfe]).unwrap();
        let errs = Catalog::load_dir(dir.path()).unwrap_err();
        assert_eq!(errs.0.len(), 3, "{errs}");
        let text = errs.to_string();
        assert_eq!(text.lines().count(), 3);
        assert!(text.contains("Bad.toml: invalid job name"));
        assert!(
            text.contains("x.toml:2: bogus: unknown field `bogus`"),
            "{text}"
        );
        assert!(text.contains("y.toml: file is not valid UTF-8"));
    }

    #[test]
    fn load_dir_missing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let errs = Catalog::load_dir(&missing).unwrap_err();
        assert_eq!(errs.0.len(), 1);
        assert_eq!(errs.0[0].file, missing);
        assert!(errs.to_string().contains("cannot read job directory"));
    }

    #[test]
    fn empty_dir_is_empty_catalog() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::load_dir(dir.path()).unwrap();
        assert!(c.is_empty());
        assert_eq!(c.iter().count(), 0);
    }

    #[test]
    fn field_at_line_heuristic() {
        let t = "a = 1\n[resources]\n  memory = \"x\"\n[params.\"n\"]\nb = 2\n";
        assert_eq!(field_at_line(t, 1).as_deref(), Some("a"));
        assert_eq!(field_at_line(t, 3).as_deref(), Some("resources.memory"));
        assert_eq!(field_at_line(t, 4).as_deref(), Some("params.n"));
        assert_eq!(field_at_line(t, 5).as_deref(), Some("params.n.b"));
        assert_eq!(field_at_line(t, 99), None);
        let t = "[[schedules]]\nname = \"a\"\n[[schedules]]\nnmae = \"b\"\n";
        assert_eq!(field_at_line(t, 1).as_deref(), Some("schedules[0]"));
        assert_eq!(field_at_line(t, 2).as_deref(), Some("schedules[0].name"));
        assert_eq!(field_at_line(t, 4).as_deref(), Some("schedules[1].nmae"));
    }
}
