//! Pure types and rules: no tokio, axum, lapin, bollard or sqlx here.

pub mod auth;
pub mod callback;
pub mod job;
pub mod job_lookup;
pub mod observe;
pub mod ports;
pub mod reply;
pub mod retention;
pub mod retry;
pub mod run;
pub mod schedule;
pub mod secret;
pub mod session;
pub mod store;
pub mod transition;
pub mod webhook;

#[cfg(test)]
mod tidy {
    /// The domain stays pure: no I/O crates, and no serde (formats live in `protocol`
    /// and `catalog`, so a domain change never silently changes one).
    #[test]
    fn domain_uses_no_io_crates_and_no_serde() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/domain");
        let forbidden = [
            "tokio", "axum", "lapin", "bollard", "sqlx", "reqwest", "hyper", "serde",
        ];
        let mut offences = Vec::new();
        let files = rust_files(&dir);
        // Guards against the walk silently finding nothing (e.g. after a move).
        assert!(
            files.iter().any(|p| p.ends_with("job/params.rs")),
            "the scan must reach files in subdirectories: {files:?}"
        );
        for path in files {
            let text = std::fs::read_to_string(&path).unwrap();
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for name in forbidden {
                    if code.contains(&format!("{name}::")) || code.contains(&format!("use {name}"))
                    {
                        offences.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                    }
                }
            }
        }
        assert!(
            offences.is_empty(),
            "domain imports I/O or serde:\n{}",
            offences.join("\n")
        );
    }

    /// Every `.rs` file under `dir`, subdirectories included.
    fn rust_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut files = Vec::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    pending.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    files.push(path);
                }
            }
        }
        files.sort();
        files
    }
}
