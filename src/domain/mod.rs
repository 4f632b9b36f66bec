//! Pure types and rules: no tokio, axum, lapin, bollard or sqlx here.

pub mod job;
pub mod ports;
pub mod retention;
pub mod retry;
pub mod run;
pub mod session;

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
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
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
}
