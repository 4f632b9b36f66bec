use serde_json::Value;

use super::*;
use crate::logsink::FileLogSink;
use crate::store::SqliteStore;
use crate::store::suite::new_run;

struct Fixture {
    sink: ExportingSink,
    run_id: RunId,
    export: PathBuf,
    _dir: tempfile::TempDir,
}

/// A stored run of job `hello`, the file sink under a temp dir, and the export beside.
async fn fixture(export: Option<PathBuf>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("data")).await.unwrap());
    let run = new_run();
    store.insert_run(&run, None).await.unwrap();
    let export = export.unwrap_or_else(|| dir.path().join("export"));
    let sink = ExportingSink::new(
        Arc::new(FileLogSink::new(dir.path().join("logs"))),
        store,
        &export,
        Duration::from_secs(7 * 86_400),
    );
    Fixture {
        sink,
        run_id: run.id,
        export,
        _dir: dir,
    }
}

fn out(text: &str) -> OutputChunk {
    OutputChunk {
        stream: Stream::Stdout,
        bytes: Bytes::copy_from_slice(text.as_bytes()),
    }
}

fn err(text: &str) -> OutputChunk {
    OutputChunk {
        stream: Stream::Stderr,
        bytes: Bytes::copy_from_slice(text.as_bytes()),
    }
}

/// Every exported line, in file order.
fn exported(dir: &Path) -> Vec<Value> {
    let path = dir.join(format!(
        "{PREFIX}{}{SUFFIX}",
        Utc::now().date_naive().format("%Y-%m-%d")
    ));
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn brief(lines: &[Value]) -> Vec<(String, String, bool)> {
    lines
        .iter()
        .map(|l| {
            (
                l["stream"].as_str().unwrap().to_owned(),
                l["line"].as_str().unwrap().to_owned(),
                l["partial"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

#[tokio::test]
async fn lines_go_out_whole_per_stream_once_and_the_open_ones_at_the_end() {
    let f = fixture(None).await;
    let first = [out("hel"), err("err1\nerr")];
    assert_eq!(f.sink.append(f.run_id, 1, 0, &first).await.unwrap(), 11);
    assert_eq!(
        f.sink
            .append(f.run_id, 1, 11, &[out("lo\nworld\n")])
            .await
            .unwrap(),
        20
    );
    // A resend of what is stored already is skipped by the store and by the export.
    assert_eq!(f.sink.append(f.run_id, 1, 0, &first).await.unwrap(), 20);
    // A resend that overlaps: only its new part counts.
    assert_eq!(
        f.sink
            .append(f.run_id, 1, 14, &[out("world\n"), out("bye")])
            .await
            .unwrap(),
        23
    );
    f.sink.sync(f.run_id, 1).await.unwrap();
    let lines = exported(&f.export);
    let s = |stream: &str, line: &str, partial| (stream.to_owned(), line.to_owned(), partial);
    assert_eq!(
        brief(&lines),
        vec![
            s("stderr", "err1", false),
            s("stdout", "hello", false),
            s("stdout", "world", false),
            s("stdout", "bye", true),
            s("stderr", "err", true),
        ]
    );
    for line in &lines {
        assert_eq!(line["job"], "hello");
        assert_eq!(line["run_id"], f.run_id.to_string());
        assert_eq!(line["attempt"], 1);
        assert!(line["time"].as_str().unwrap().ends_with('Z'));
    }
    // The stored log is the bytes, untouched.
    let stored = f.sink.read(f.run_id, 1, 0, 100).await.unwrap();
    assert_eq!(&stored[..], b"helerr1\nerrlo\nworld\nbye");
}

#[tokio::test]
async fn a_line_longer_than_the_limit_goes_out_in_pieces() {
    let f = fixture(None).await;
    let long = "x".repeat(MAX_LINE + 10);
    f.sink
        .append(f.run_id, 1, 0, &[out(&long), out("\n")])
        .await
        .unwrap();
    let lines = brief(&exported(&f.export));
    assert_eq!(
        lines.len(),
        2,
        "{:?}",
        lines.iter().map(|l| l.1.len()).collect::<Vec<_>>()
    );
    assert_eq!((lines[0].1.len(), lines[0].2), (MAX_LINE, true));
    assert_eq!((lines[1].1.len(), lines[1].2), (10, false));
}

#[tokio::test]
async fn files_of_days_past_the_kept_ones_are_removed_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("export");
    std::fs::create_dir_all(&export).unwrap();
    let today = Utc::now().date_naive();
    let day = |days: u64| {
        export.join(format!(
            "{PREFIX}{}{SUFFIX}",
            (today - chrono::Days::new(days)).format("%Y-%m-%d")
        ))
    };
    for path in [day(10), day(7), day(1)] {
        std::fs::write(&path, "{}\n").unwrap();
    }
    std::fs::write(export.join("notes.txt"), "mine").unwrap();
    let f = fixture(Some(export.clone())).await;
    f.sink.append(f.run_id, 1, 0, &[out("a\n")]).await.unwrap();
    assert!(!day(10).exists());
    assert!(day(7).exists() && day(1).exists());
    assert!(export.join("notes.txt").exists());
    assert_eq!(exported(&export).len(), 1);
}

#[tokio::test]
async fn an_export_that_cannot_be_written_never_fails_the_stored_log() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, "").unwrap();
    let f = fixture(Some(not_a_dir.join("export"))).await;
    assert_eq!(
        f.sink
            .append(f.run_id, 1, 0, &[out("kept\n")])
            .await
            .unwrap(),
        5
    );
    f.sink.sync(f.run_id, 1).await.unwrap();
    assert_eq!(
        &f.sink.read(f.run_id, 1, 0, 10).await.unwrap()[..],
        b"kept\n"
    );
}

#[tokio::test]
async fn an_attempt_that_ends_unsynced_has_its_open_line_closed_once_idle() {
    let mut f = fixture(None).await;
    f.sink.idle = Duration::from_millis(50);
    f.sink
        .append(f.run_id, 1, 0, &[out("cut off by a vanished worker")])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Attempt 2 (the retry elsewhere) writes: attempt 1, idle, is closed first.
    f.sink
        .append(f.run_id, 2, 0, &[out("again\n")])
        .await
        .unwrap();
    let lines = exported(&f.export);
    let seen: Vec<(u64, &str, bool)> = lines
        .iter()
        .map(|l| {
            (
                l["attempt"].as_u64().unwrap(),
                l["line"].as_str().unwrap(),
                l["partial"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (1, "cut off by a vanished worker", true),
            (2, "again", false)
        ]
    );
    assert!(lines.iter().all(|l| l["job"] == "hello"));
    assert_eq!(locked(&f.sink.open).len(), 1);
}
