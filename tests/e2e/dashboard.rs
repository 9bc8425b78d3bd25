//! The web dashboard in a real headless Chromium (Debian's chromium + chromium-driver, driven over the
//! W3C WebDriver protocol): a request without the auth token is refused; the job page of a running tiny SFT
//! job draws its loss chart and the chart gains points as events stream in; the cancel button cancels the
//! job; the playground streams an answer; the start form refuses a recipe outside the artifact root and
//! starts one inside it. A screenshot of the job page is written where FERROTUNE_DASHBOARD_SCREENSHOT says
//! (README's `docs/dashboard-job.png`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferrotune_runtime::tracking::http::{self, Body, Endpoint};
use ferrotune_tests::{repo, tiny_chat_in, Server};
use serde_json::{json, Value};

const TOKEN: &str = "dash-secret";

/// A ChromeDriver child and one browser session.
struct Browser {
    driver: Child,
    ep: Endpoint,
    session: String,
}

impl Browser {
    fn start(profile: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (make test-tools installs Debian's chromium-driver)");
        let ep = Endpoint::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        let start = Instant::now();
        while http::request(&ep, "GET", "/status", None, Body::Empty).is_err() {
            assert!(start.elapsed() < Duration::from_secs(30), "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--window-size=1280,1000", format!("--user-data-dir={}", profile.display())]}}}});
        let mut b = Self { driver, ep, session: String::new() };
        let v = b.call("POST", "/session", Some(caps));
        b.session = v["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {v}")).to_owned();
        b
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let bytes = body.map(|b| b.to_string().into_bytes());
        let b = match &bytes {
            Some(b) => Body::Json(b),
            None => Body::Empty,
        };
        let r = http::request(&self.ep, method, path, None, b).expect("webdriver call");
        let v = r.json()["value"].clone();
        assert!(r.status < 300, "webdriver {method} {path}: {v}");
        v
    }

    fn s(&self, p: &str) -> String {
        format!("/session/{}{p}", self.session)
    }

    fn go(&self, url: &str) {
        self.call("POST", &self.s("/url"), Some(json!({"url": url})));
    }

    fn js(&self, script: &str) -> Value {
        self.call("POST", &self.s("/execute/sync"), Some(json!({"script": script, "args": []})))
    }

    fn element(&self, css: &str) -> String {
        let v = self.call("POST", &self.s("/element"), Some(json!({"using": "css selector", "value": css})));
        v["element-6066-11e4-a52e-4f735466cecf"].as_str().unwrap().to_owned()
    }

    fn click(&self, css: &str) {
        let e = self.element(css);
        self.call("POST", &self.s(&format!("/element/{e}/click")), Some(json!({})));
    }

    fn type_in(&self, css: &str, text: &str) {
        let e = self.element(css);
        self.call("POST", &self.s(&format!("/element/{e}/clear")), Some(json!({})));
        self.call("POST", &self.s(&format!("/element/{e}/value")), Some(json!({"text": text})));
    }

    /// Waits up to `secs` for `script` (an expression) to be truthy; its value.
    fn until(&self, what: &str, script: &str, secs: u64) -> Value {
        let start = Instant::now();
        loop {
            // A page still rendering has no element yet: that is "not yet", not an error.
            let v = self.js(&format!("try {{ return ({script}); }} catch (e) {{ return null; }}"));
            if v.as_bool() != Some(false) && !v.is_null() && v != json!(0) && v != json!("") {
                return v;
            }
            assert!(start.elapsed() < Duration::from_secs(secs), "{what}: not within {secs} s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&self) -> Vec<u8> {
        base64(self.call("GET", &self.s("/screenshot"), None).as_str().unwrap())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = http::request(&self.ep, "DELETE", &self.s(""), None, Body::Empty);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn base64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let clean: Vec<u8> = s.bytes().filter(|c| !matches!(c, b'=' | b'\n' | b'\r')).collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &c)| acc | (val(c) as u32) << (18 - 6 * i));
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

fn api(ep: &Endpoint, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let r = http::request(ep, method, path, token, Body::Empty).unwrap();
    (r.status, r.json())
}

fn recipe(root: &Path, name: &str, out: &str, steps: u32) {
    let model = tiny_chat_in(root);
    let text = format!(
        "model: {model}\nadapter: {{method: lora, r: 4, target_modules: [q_proj, v_proj]}}\n\
         data: {{path: pirate-train.jsonl, format: messages, max_seq_len: 128}}\n\
         training: {{max_steps: {steps}, micro_batch_size: 1, save_steps: 0, learning_rate: 1.0e-3}}\noutput_dir: {out}\n"
    );
    std::fs::write(root.join(name), text).unwrap();
}

#[test]
fn dashboard_in_headless_chromium_charts_cancels_streams_and_starts_jobs() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let root = root.canonicalize().unwrap();
    std::fs::copy(repo("recipes/data/pirate-train.jsonl"), root.join("pirate-train.jsonl")).unwrap();
    recipe(&root, "long.yaml", "runs/long", 100_000);
    recipe(&root, "short.yaml", "runs/short", 3);
    std::fs::write(t.path().join("outside.yaml"), "model: x\n").unwrap();
    let server = Server::start(
        "policy",
        &root,
        &[("FERROTUNE__HTTP__LISTEN", "127.0.0.1:0"), ("FERROTUNE__AUTH__TOKEN", TOKEN), ("OMP_NUM_THREADS", "1")],
    );
    let url = server.line.split(" dashboard ").nth(1).expect("the dashboard address on the listening line").trim();
    let ep = Endpoint::parse(url.trim_end_matches('/')).unwrap();

    // Nothing without the token.
    for p in ["/", "/app.js", "/api/jobs"] {
        assert_eq!(api(&ep, "GET", p, None).0, 401, "{p} without the token");
        assert_eq!(api(&ep, "GET", p, Some("wrong")).0, 401, "{p} with a wrong token");
    }
    assert_eq!(api(&ep, "GET", "/api/jobs", Some(TOKEN)).0, 200);

    let profile = tempfile::tempdir().unwrap();
    let b = Browser::start(profile.path());
    // The page takes the token once from the query (as a cookie from then on).
    b.go(&format!("{url}?token={TOKEN}#/start"));
    b.until("the start form", "document.querySelector('#st-recipe')", 30);
    b.type_in("#st-recipe", "../outside.yaml");
    b.click("#st-submit");
    let refused = b.until("the refusal", "document.querySelector('#st-result.error')?.textContent", 30);
    assert!(refused.as_str().unwrap().contains("outside the artifact root"), "{refused}");
    b.type_in("#st-recipe", "long.yaml");
    b.click("#st-submit");
    let id = b.until("the started job", "document.querySelector('#st-job')?.textContent", 60);
    let id = id.as_str().unwrap().to_owned();

    // The job page: the loss chart gains points while the job runs.
    b.click("#st-job");
    let first = b.until("the loss chart", "+document.querySelector('#chart-loss').dataset.points >= 3 && +document.querySelector('#chart-loss').dataset.points", 120);
    let more = b.until(
        "more points",
        &format!("+document.querySelector('#chart-loss').dataset.points > {} + 5 && +document.querySelector('#chart-loss').dataset.points", first),
        120,
    );
    assert!(more.as_u64().unwrap() > first.as_u64().unwrap());
    assert_eq!(b.js("return document.querySelector('#state')?.textContent"), json!("running"));
    b.until("the metrics table", "document.querySelector('#metrics')?.textContent.includes('grad_norm')", 30);
    let png = b.screenshot();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    if let Ok(dest) = std::env::var("FERROTUNE_DASHBOARD_SCREENSHOT") {
        std::fs::write(dest, &png).unwrap();
    }
    // Cancel.
    b.click("#cancel");
    b.until("the cancelled state", "document.querySelector('#state').textContent == 'cancelled'", 120);
    let (_, j) = api(&ep, "GET", &format!("/api/jobs/{id}"), Some(TOKEN));
    assert_eq!(j["state"], "cancelled", "{j}");

    // The jobs list shows it; the playground streams an answer.
    b.go(&format!("{url}#/"));
    b.until("the jobs table", &format!("document.querySelector('tr[data-id=\"{id}\"]')"), 30);
    b.go(&format!("{url}#/playground"));
    b.until("the playground", "document.querySelector('#pg-model')", 30);
    b.type_in("#pg-model", "tiny-chat");
    b.type_in("#pg-prompt", "Where is the treasure?");
    b.type_in("#pg-max", "48");
    b.click("#pg-send");
    b.until("the answer's end", "document.querySelector('#pg-out').dataset.done == '1'", 120);
    let chunks = b.js("return +document.querySelector('#pg-out').dataset.chunks").as_u64().unwrap();
    let text = b.js("return document.querySelector('#pg-out').textContent");
    assert!(chunks > 1, "the answer came in one piece ({chunks} chunks): {text}");
    assert!(!text.as_str().unwrap().is_empty());

    // A short job run to its end lists its artifacts with working download links.
    b.go(&format!("{url}#/start"));
    b.until("the start form", "document.querySelector('#st-recipe')", 30);
    b.type_in("#st-recipe", "short.yaml");
    b.click("#st-submit");
    b.until("the started job", "document.querySelector('#st-job')", 60);
    b.click("#st-job");
    b.until("the finished job", "document.querySelector('#state').textContent == 'succeeded'", 120);
    let link = b.until("an adapter link", "[...document.querySelectorAll('#artifacts a')].map(a => a.getAttribute('href')).find(h => h.includes('metrics'))", 30);
    let r = http::request(&ep, "GET", link.as_str().unwrap(), Some(TOKEN), Body::Empty).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(String::from_utf8_lossy(&r.body).lines().count(), 3, "metrics.jsonl of the 3 steps");

    // A pipeline run on this root (by the CLI, embedded services) shows on the pipelines page.
    std::fs::copy(repo("recipes/data/pirate-eval.jsonl"), root.join("pirate-eval.jsonl")).unwrap();
    let p = "name: dash\noutput_dir: runs/dash\nstages:\n  sft: {kind: sft, recipe: short.yaml}\n  \
             eval: {kind: eval, model: tiny-chat, adapter: '${sft.adapter}', prompts: pirate-eval.jsonl, max_new_tokens: 4, rules: {ahoy: 'regex:^Ahoy'}}\n";
    std::fs::write(root.join("dash.yaml"), p).unwrap();
    let o = ferrotune_tests::run_cli_env(&root, &[], &["pipeline", "run", "dash.yaml"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    b.go(&format!("{url}#/pipelines"));
    let done = "table.pipeline[data-name=\"dash\"] tr[data-stage=\"eval\"] .state.succeeded";
    b.until("the pipeline's stages", &format!("document.querySelector('{done}')"), 30);
    let job_link = b.js("return document.querySelector('table.pipeline[data-name=\"dash\"] tr[data-stage=\"sft\"] a')?.getAttribute('href')");
    assert!(job_link.as_str().is_some_and(|h| h.starts_with("#/job/sft-")), "{job_link}");
    drop(server);
}
