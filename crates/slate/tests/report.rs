//! The HTML report in a real browser: Debian's chromium, headless, driven
//! through chromedriver's WebDriver API. The test asserts what a person
//! sees: one bar per target, the failed one marked, a click on it shows its
//! log, no console errors, no network request. Needs root (the build) and
//! chromium with chromium-driver; `scripts/test.sh` runs it.

mod common;

use common::{require_tool, text, Project};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};

const IMAGE: &str = "[images.bb]\nfrom = \"tar:bb.tar.gz\"\n";

/// A chromedriver on a loopback port with one headless chromium session,
/// both ended when dropped.
struct Browser {
    driver: Child,
    base: String,
    session: String,
}

impl Browser {
    #[track_caller]
    fn start() -> Browser {
        let chromedriver = require_tool("chromedriver", "chromium-driver");
        let chromium = require_tool("chromium", "chromium");
        let port = common::free_port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        // Ready when its status says so (bounded: 30 s).
        let ready = (0..300).any(|_| {
            let up = ureq::get(&format!("{base}/status"))
                .call()
                .ok()
                .and_then(|r| serde_json::from_str::<Value>(&r.into_string().ok()?).ok())
                .is_some_and(|v| v["value"]["ready"] == true);
            if !up {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            up
        });
        let mut b = Browser {
            driver,
            base,
            session: String::new(),
        };
        assert!(ready, "chromedriver did not start");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000"],
            },
            "goog:loggingPrefs": {"browser": "ALL", "performance": "ALL"},
        }}});
        let v = b.post("/session", caps);
        b.session = v["sessionId"].as_str().unwrap().to_string();
        b
    }

    #[track_caller]
    fn post(&self, path: &str, body: Value) -> Value {
        let url = if path == "/session" {
            format!("{}{path}", self.base)
        } else {
            format!("{}/session/{}{path}", self.base, self.session)
        };
        let sent = ureq::post(&url)
            .set("content-type", "application/json")
            .send_string(&body.to_string());
        match sent {
            Ok(r) => {
                serde_json::from_str::<Value>(&r.into_string().unwrap()).unwrap()["value"].clone()
            }
            Err(ureq::Error::Status(code, r)) => {
                panic!(
                    "WebDriver {path}: {code}: {}",
                    r.into_string().unwrap_or_default()
                )
            }
            Err(e) => panic!("WebDriver {path}: {e}"),
        }
    }

    #[track_caller]
    fn get(&self, path: &str) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let text = ureq::get(&url).call().unwrap().into_string().unwrap();
        serde_json::from_str::<Value>(&text).unwrap()["value"].clone()
    }

    /// The element `css` selects (its WebDriver id).
    #[track_caller]
    fn find(&self, css: &str) -> String {
        let v = self.post("/element", json!({"using": "css selector", "value": css}));
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(|id| id.as_str())
            .unwrap_or_else(|| panic!("no element {css}"))
            .to_string()
    }

    /// What a person sees of the element `css`.
    fn seen(&self, css: &str) -> String {
        let id = self.find(css);
        self.get(&format!("/element/{id}/text"))
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn script(&self, js: &str) -> Value {
        self.post("/execute/sync", json!({"script": js, "args": []}))
    }

    /// The browser's log of `kind` (`browser`: the console, `performance`:
    /// the DevTools events, network requests among them).
    fn log(&self, kind: &str) -> Vec<Value> {
        self.post("/se/log", json!({ "type": kind }))
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = ureq::delete(&format!("{}/session/{}", self.base, self.session)).call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[test]
#[ignore = "needs root, chromium and chromium-driver: scripts/test.sh runs it"]
fn root_report_shows_one_bar_per_target_marks_the_failure_and_shows_a_log_on_click() {
    common::require_root();
    // Markup in the output: were it taken as markup, the image would be
    // requested and the scripts would raise errors.
    let hostile =
        "<img src=http://203.0.113.7/x.png onerror=alert(1)></script><script>alert(2)</script><!--";
    let p = Project::new(&format!(
        "{IMAGE}[builds.good]\nimage = \"bb\"\nrun = [\"mkdir -p out\", \"echo made > out/a.txt\"]\nartifacts = [\"out/a.txt\"]\n\
         [builds.other]\nimage = \"bb\"\nrun = [\"echo fine\"]\n\
         [builds.broken]\nimage = \"bb\"\nrun = [\"echo '{hostile}'\", \"echo compiling\", \"exit 2\"]\n"
    ));
    let o = p.run(&["build"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    let (_, run) = p.last_run();
    let page = run.join("report.html");
    assert!(page.is_file(), "{out}");
    assert!(out.contains("report: .slate/runs/"), "{out}");

    let b = Browser::start();
    let url = format!("file://{}", page.display());
    b.post("/url", json!({ "url": url }));

    // One bar per target, the failed one marked as failed.
    let bars = b.script(
        "return [...document.querySelectorAll('.bar')].map(b => [b.dataset.target, b.className, b.getBoundingClientRect().width > 0])",
    );
    let mut bars: Vec<(String, String, bool)> = serde_json::from_value(bars).unwrap();
    bars.sort();
    assert_eq!(bars.len(), 3, "{bars:?}");
    assert_eq!(
        bars.iter().map(|b| b.0.as_str()).collect::<Vec<_>>(),
        ["broken", "good", "other"]
    );
    assert!(bars.iter().all(|b| b.2), "a bar is not visible: {bars:?}");
    assert!(bars[0].1.contains("failed"), "{bars:?}");
    assert!(
        bars[1].1.contains("succeeded") && !bars[1].1.contains("failed"),
        "{bars:?}"
    );
    let timeline = b.seen("#timeline");
    assert!(timeline.contains("failed broken"), "{timeline}");
    assert!(timeline.contains("succeeded good"), "{timeline}");
    // The failure is spelled out with the failing step.
    let failures = b.seen("#failures");
    assert!(failures.contains("broken: failed (exit 2)"), "{failures}");
    assert!(failures.contains("failing step: run: exit 2"), "{failures}");
    // The artifact with its size and sha256.
    let arts = b.seen("#artifacts");
    let sum = p.read("artifacts/SHA256SUMS");
    let sha = sum.split_whitespace().next().unwrap();
    assert!(arts.contains("good/a.txt") && arts.contains(sha), "{arts}");

    // Before a click no log is shown; a click on the failed target shows
    // its whole log, the build's output as text, the failing step marked.
    assert_eq!(b.seen("#log"), "");
    let row = b.find(".row[data-target=\"broken\"]");
    b.post(&format!("/element/{row}/click"), json!({}));
    let log = b.seen("#log");
    assert!(log.contains(hostile), "{log}");
    assert!(log.contains("compiling"), "{log}");
    let marked = b.script(
        "return [...document.querySelectorAll('#log .mark')].map(m => m.textContent.trim())",
    );
    assert_eq!(
        marked,
        json!(["==> run: exit 2", "==> run: exit 2 failed"]),
        "{log}"
    );
    let row = b.find(".row[data-target=\"other\"]");
    b.post(&format!("/element/{row}/click"), json!({}));
    assert!(b.seen("#log").contains("fine"));

    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report-screenshot.png");
    let png = b.get("/screenshot");
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD
        .decode(png.as_str().unwrap())
        .unwrap();
    std::fs::write(&shot, png).unwrap();
    println!("screenshot: {}", shot.display());

    // No console errors, no request but the page itself.
    let console = b.log("browser");
    let errors: Vec<&Value> = console.iter().filter(|e| e["level"] == "SEVERE").collect();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    let requests: Vec<String> = b
        .log("performance")
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e["message"].as_str()?).ok())
        .filter(|m| m["message"]["method"] == "Network.requestWillBeSent")
        .map(|m| {
            m["message"]["params"]["request"]["url"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert!(
        requests.iter().all(|u| *u == url),
        "the report made requests: {requests:?}"
    );
    assert!(
        !requests.is_empty(),
        "the performance log saw nothing at all"
    );
}
