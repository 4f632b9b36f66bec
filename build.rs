// The migrations are compiled in (`sqlx::migrate!`): a new or changed migration file
// must rebuild the crate. The commit the binary is built from is compiled in too, as
// TASUKI_COMMIT, so that `--version`, the start-up log and `tasuki_build_info` tell
// builds of one version apart (a rolling upgrade runs two side by side): from the
// TASUKI_BUILD_COMMIT variable when set (a build from an archive has no .git), else
// from git, else "unknown".
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-env-changed=TASUKI_BUILD_COMMIT");
    let commit = std::env::var("TASUKI_BUILD_COMMIT")
        .ok()
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty())
        .or_else(git_commit)
        .map(|c| c.chars().take(12).collect::<String>())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=TASUKI_COMMIT={commit}");
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

/// HEAD's commit, watching the files that change when HEAD moves (HEAD itself, the
/// branch it names, packed refs) so that a new commit reruns this script. Only files
/// that exist are watched: a missing one would rerun it on every build.
fn git_commit() -> Option<String> {
    let commit = git(&["rev-parse", "HEAD"])?;
    let mut watched = vec![git(&["rev-parse", "--git-path", "HEAD"])];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(git(&["rev-parse", "--git-path", &branch]));
    }
    watched.push(git(&["rev-parse", "--git-path", "packed-refs"]));
    for path in watched.into_iter().flatten() {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    Some(commit)
}
