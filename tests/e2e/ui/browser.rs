//! A real headless Chromium driven over WebDriver: Debian's `chromedriver` on a free
//! port, in a process group of its own so it and the browser it starts are killed by
//! that group's id at the end, whatever happens.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// chromedriver and its browser; both go when this is dropped.
pub struct Driver {
    child: Child,
    pub url: String,
    /// Chromium's profile, fresh for each test.
    _profile: tempfile::TempDir,
    profile_path: PathBuf,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

impl Driver {
    pub fn start() -> Driver {
        use std::os::unix::process::CommandExt;
        let port = free_port();
        let profile = tempfile::tempdir().expect("profile dir");
        let profile_path = profile.path().to_owned();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start chromedriver (tests/run.sh installs chromium-driver)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _profile: profile,
            profile_path,
        }
    }

    /// A headless browser session that records the browser's console (`goog:loggingPrefs`).
    pub async fn browser(&self) -> Client {
        let profile = format!("--user-data-dir={}", self.profile_path.display());
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1400,1000", profile,
                ],
            },
            "goog:loggingPrefs": { "browser": "ALL" },
        });
        let Value::Object(caps) = caps else {
            unreachable!("a JSON object")
        };
        ClientBuilder::rustls()
            .expect("rustls connector")
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The group chromedriver leads: chromedriver and every browser process it made.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// chromedriver's `POST /session/{id}/se/log`: the browser console since the last ask.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!("session/{}/se/log", session_id.unwrap_or("")))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.to_owned()))
    }
}

/// Every browser console entry so far: (level, message).
pub async fn console(client: &Client) -> Vec<(String, String)> {
    let entries = client.issue_cmd(BrowserLog).await.expect("browser log");
    entries
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["level"].as_str().unwrap_or("").to_owned(),
                e["message"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// Evaluate `expression` in the page (a JSON value).
pub async fn eval(client: &Client, expression: &str) -> Value {
    client
        .execute(&format!("return {expression};"), Vec::new())
        .await
        .unwrap_or(Value::Null)
}

/// Poll `expression` until it is `true`, or fail with `what` and the page's text.
pub async fn wait_true(client: &Client, expression: &str, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    loop {
        if eval(client, expression).await == Value::Bool(true) {
            return;
        }
        if Instant::now() > deadline {
            let text = eval(client, "document.body ? document.body.innerText : ''").await;
            panic!("{what}: `{expression}` not true within {within:?}; page:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn text_of(client: &Client, css: &str) -> String {
    let element = client.find(Locator::Css(css)).await.expect(css);
    element.text().await.expect("text")
}

/// Replace an input's value by typing.
pub async fn fill(client: &Client, css: &str, value: &str) {
    let element = client.find(Locator::Css(css)).await.expect(css);
    element.clear().await.expect("clear");
    element.send_keys(value).await.expect("type");
}

pub async fn click(client: &Client, css: &str) {
    let element = client.find(Locator::Css(css)).await.expect(css);
    element.click().await.expect("click");
}

/// A screenshot into `$TASUKI_UI_SCREENSHOTS/{name}.png`, when that is set.
pub async fn screenshot(client: &Client, name: &str) {
    let Ok(dir) = std::env::var("TASUKI_UI_SCREENSHOTS") else {
        return;
    };
    let png = client.screenshot().await.expect("screenshot");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    std::fs::write(PathBuf::from(dir).join(format!("{name}.png")), png).expect("write png");
}
