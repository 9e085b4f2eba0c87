//! Headless Chromium (Debian's `chromium` package, which `scripts/test` installs; nothing
//! downloads a browser) driven over the DevTools protocol on a WebSocket: one page, opened on
//! an address, read with JavaScript expressions, resized, photographed. The browser gets a
//! profile of its own and is stopped when the [`Browser`] is dropped.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::ChildGuard;

/// Why the browser could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BrowserError {
    /// No chromium on `PATH`.
    #[error("chromium is not installed (apt-get install chromium; scripts/test installs it)")]
    Missing(#[source] std::io::Error),
    /// It did not say where its DevTools endpoint is.
    #[error("chromium did not print its DevTools address; it said: {0}")]
    NoEndpoint(String),
    /// The DevTools WebSocket failed.
    #[error("talking to chromium over DevTools")]
    Socket(#[from] tokio_tungstenite::tungstenite::Error),
    /// A command failed.
    #[error("chromium refused {method}: {error}")]
    Command {
        /// The command.
        method: String,
        /// Its error.
        error: Value,
    },
    /// The connection closed.
    #[error("chromium closed the DevTools connection")]
    Closed,
    /// A screenshot could not be written.
    #[error("writing a screenshot")]
    Write(#[source] std::io::Error),
}

/// A headless browser with one page.
pub struct Browser {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
    _process: ChildGuard,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromium (trusting any certificate: the test's own CA is not in its store) with
    /// one blank page.
    pub async fn start() -> Result<Self, BrowserError> {
        let profile = tempfile::tempdir().map_err(BrowserError::Missing)?;
        let mut child = Command::new("chromium")
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--ignore-certificate-errors",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(BrowserError::Missing)?;
        let stderr = child.stderr.take();
        let process = ChildGuard::new(child);
        let reading = tokio::task::spawn_blocking(move || {
            let mut said = String::new();
            for line in BufReader::new(stderr?).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    return Some(Ok(url.trim().to_owned()));
                }
                said.push_str(&line);
                said.push('\n');
            }
            Some(Err(said))
        });
        // A chromium that says nothing must not hang the test: it is killed with its guard.
        let endpoint = tokio::time::timeout(Duration::from_secs(30), reading)
            .await
            .map_err(|_| BrowserError::NoEndpoint("nothing within 30 s".to_owned()))?
            .ok()
            .flatten()
            .unwrap_or_else(|| Err(String::new()))
            .map_err(BrowserError::NoEndpoint)?;
        let (socket, _) = tokio_tungstenite::connect_async(endpoint.as_str()).await?;
        let mut browser = Self {
            socket,
            session: String::new(),
            next_id: 0,
            _process: process,
            _profile: profile,
        };
        let target = browser
            .call("Target.createTarget", json!({ "url": "about:blank" }))
            .await?;
        let attached = browser
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await?;
        browser.session = attached["sessionId"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        browser.call("Page.enable", json!({})).await?;
        Ok(browser)
    }

    /// Sends a command (to the page, once attached) and returns its result.
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value, BrowserError> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        self.socket.send(Message::text(message.to_string())).await?;
        while let Some(message) = self.socket.next().await {
            let Message::Text(text) = message? else {
                continue;
            };
            let Ok(answer) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            if answer["id"] != json!(id) {
                continue;
            }
            if let Some(error) = answer.get("error") {
                return Err(BrowserError::Command {
                    method: method.to_owned(),
                    error: error.clone(),
                });
            }
            return Ok(answer["result"].clone());
        }
        Err(BrowserError::Closed)
    }

    /// Opens `url` and waits until its document (not the one before it) has loaded.
    pub async fn open(&mut self, url: &str) -> Result<(), BrowserError> {
        self.evaluate("window.droverLeaving = true").await?;
        self.call("Page.navigate", json!({ "url": url })).await?;
        self.wait_for("window.droverLeaving === undefined && document.readyState === 'complete'")
            .await
    }

    /// The value of a JavaScript expression in the page (awaited if it is a promise).
    pub async fn evaluate(&mut self, expression: &str) -> Result<Value, BrowserError> {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        Ok(result["result"]["value"].clone())
    }

    /// Waits, up to a minute, until `expression` is true in the page.
    ///
    /// # Panics
    /// Past the minute, with what the page shows: the test fails there.
    pub async fn wait_for(&mut self, expression: &str) -> Result<(), BrowserError> {
        let deadline = tokio::time::Instant::now() + Duration::from_mins(1);
        loop {
            if self.evaluate(expression).await? == json!(true) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                let page = self
                    .evaluate("document.body ? document.body.innerText : ''")
                    .await?;
                panic!("the page never had {expression}; it shows:\n{page}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Lays the page out `width` CSS pixels wide (a phone's 375, a desktop's 1280).
    pub async fn resize(&mut self, width: u32, height: u32) -> Result<(), BrowserError> {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600 }),
        )
        .await?;
        Ok(())
    }

    /// Writes a PNG of the page's whole length to `path`.
    pub async fn screenshot(&mut self, path: &Path) -> Result<(), BrowserError> {
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({ "format": "png", "captureBeyondViewport": true }),
            )
            .await?;
        let data = shot["data"].as_str().unwrap_or_default();
        let bytes = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, data)
            .map_err(|error| BrowserError::Write(std::io::Error::other(error)))?;
        if let Some(parent) = path.parent() {
            fs_err::create_dir_all(parent).map_err(BrowserError::Write)?;
        }
        fs_err::write(path, bytes).map_err(BrowserError::Write)
    }
}
