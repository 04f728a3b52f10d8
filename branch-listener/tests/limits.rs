//! The listener's exposure, on the real binary: read-only (every other method 405,
//! unknown paths 404), request head limits, rate limits per client for requests without a
//! valid token (HQ's are not limited), and tokens never in
//! a log line or in HQ's status output.

use anyhow::Result;
use std::time::Duration;
use tests::fleet::{BranchNode, BranchOptions, Hq, HqOptions};
use tests::process::wait_for;

async fn branch(dir: &std::path::Path, extra: &str) -> Result<BranchNode> {
    let url = format!("sqlite://{}", dir.join("b01.db").display());
    let mut b = BranchNode::new(
        dir,
        "b01",
        &url,
        &BranchOptions {
            extra: extra.into(),
            ..BranchOptions::default()
        },
    )?;
    b.install(true).await?;
    b.start().await?;
    Ok(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_endpoints_and_request_limits() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut b = branch(
        dir.path(),
        "rate_limit_per_second = 2\nrate_limit_burst = 400\n",
    )
    .await?;
    let client = reqwest::Client::new();
    let base = b.url();
    // Every method but GET (and HEAD) on every endpoint: 405, token or not.
    for path in ["/v1/changes", "/v1/status", "/metrics", "/healthz"] {
        for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
            let m = reqwest::Method::from_bytes(method.as_bytes())?;
            let r = client
                .request(m, format!("{base}{path}"))
                .bearer_auth(b.token())
                .body("{}")
                .send()
                .await?;
            assert_eq!(r.status().as_u16(), 405, "{method} {path}");
        }
    }
    // Unknown paths: 404, token or not.
    for path in [
        "/",
        "/v1",
        "/v1/changes/x",
        "/admin",
        "/v2/changes",
        "/../etc/passwd",
    ] {
        let r = client
            .get(format!("{base}{path}"))
            .bearer_auth(b.token())
            .send()
            .await?;
        assert_eq!(r.status().as_u16(), 404, "{path}");
    }
    // An oversized request head: 431.
    let r = client
        .get(format!("{base}/v1/status"))
        .bearer_auth(b.token())
        .header("x-padding", "p".repeat(20_000))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 431);

    // The token bucket: the burst, then 429 `rate_limited` with Retry-After.
    b.stop().await?;
    let dir2 = tempfile::tempdir()?;
    let mut b = branch(
        dir2.path(),
        "rate_limit_per_second = 1\nrate_limit_burst = 5\n",
    )
    .await?;
    let base = b.url();
    // File content requests with a valid token are not charged (HQ fetches every file
    // with its own request): 30 of them leave the bucket full.
    let sha = "0".repeat(64);
    for _ in 0..30 {
        let r = client
            .get(format!("{base}/v1/files/{sha}"))
            .bearer_auth(b.token())
            .send()
            .await?;
        assert_ne!(
            r.status().as_u16(),
            429,
            "a file request with a valid token was rate-limited"
        );
    }
    let r = client.get(format!("{base}/healthz")).send().await?;
    assert_eq!(r.status().as_u16(), 200, "file requests drained the bucket");
    let mut limited = None;
    for _ in 0..50 {
        let r = client.get(format!("{base}/healthz")).send().await?;
        if r.status().as_u16() == 429 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("50 rapid requests never hit the rate limit");
    // Without a valid token a file request is charged like any other (guessing tokens).
    let unauthenticated = client
        .get(format!("{base}/v1/files/{sha}"))
        .bearer_auth("wrong-token-4f1c0a9e7d2b")
        .send()
        .await?;
    assert_eq!(unauthenticated.status().as_u16(), 429);
    assert!(r.headers().get("retry-after").is_some());
    let body: schemas::wire::ErrorBody = r.json().await?;
    assert_eq!(body.error.code, "rate_limited");
    // A wrong token is limited like no token.
    let r = client
        .get(format!("{base}/v1/status"))
        .bearer_auth("wrong-token-0123456789")
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 429);
    // The empty bucket does not hold back a client presenting a valid token (HQ):
    // 50 rapid requests are all served.
    for i in 0..50 {
        let r = client
            .get(format!("{base}/v1/status"))
            .bearer_auth(b.token())
            .send()
            .await?;
        assert!(r.status().is_success(), "request {i}: {}", r.status());
    }
    let r = client
        .get(format!("{base}/metrics"))
        .bearer_auth(b.token())
        .send()
        .await?;
    assert!(r.status().is_success());
    let text = r.text().await?;
    // The bucket refills: the unauthenticated client is served again.
    wait_for(
        "the rate limit to let /healthz through",
        Duration::from_secs(20),
        || async {
            let r = client.get(format!("{base}/healthz")).send().await?;
            Ok(r.status().is_success().then_some(()))
        },
    )
    .await?;
    assert!(
        text.contains("branch_listener_rejected_requests_total{reason=\"rate\"}"),
        "{text}"
    );
    b.stop().await
}

/// Tokens appear in no log line (listener or HQ, right or wrong token) and not in
/// `hq-puller status` output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_never_logged_or_shown() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut b = branch(dir.path(), "").await?;
    let client = reqwest::Client::new();
    let wrong = "wrong-token-4f1c0a9e7d2b";
    for path in ["/v1/changes", "/v1/status", "/metrics"] {
        let r = client
            .get(format!("{}{path}", b.url()))
            .bearer_auth(wrong)
            .send()
            .await?;
        assert_eq!(r.status().as_u16(), 401);
    }
    let mut hq = Hq::new(
        dir.path(),
        &tests::pg::fresh_database("tokens_hq").await?,
        &HqOptions::default(),
        &[&b],
    )
    .await?;
    hq.migrate().await?;
    hq.command(&["pull", "b01"]).await?;
    let status = hq.command(&["status"]).await?;
    let status_json = hq.command(&["status", "--json"]).await?;
    // A rejected token at HQ: the error is logged and recorded, the token is not.
    std::fs::write(&b.hq_token_file, format!("{wrong}\n"))?;
    hq.start()?;
    let h = &hq;
    wait_for(
        "HQ to record the rejected token",
        Duration::from_secs(30),
        || async {
            Ok(match h.location_state("b01").await? {
                Some((s, Some(e))) if s == "paused" && e.contains("token rejected") => Some(()),
                _ => None,
            })
        },
    )
    .await?;
    let status_after = hq.command(&["status", "--json"]).await?;
    hq.stop().await?;
    b.stop().await?;
    let listener_log = std::fs::read_to_string(&b.log)?;
    let hq_log = std::fs::read_to_string(&hq.log)?;
    for (what, text) in [
        ("listener log", &listener_log),
        ("hq-puller log", &hq_log),
        ("status", &status),
        ("status --json", &status_json),
        ("status --json after the rejection", &status_after),
    ] {
        assert!(!text.contains(b.token()), "{what} shows the token");
        assert!(!text.contains(wrong), "{what} shows the wrong token");
    }
    assert!(hq_log.contains("token rejected"), "{hq_log}");
    Ok(())
}

/// Rotation without a restart: a token added to the listener's token file is accepted
/// within seconds, and the old one is refused once removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_rotation_needs_no_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut b = branch(dir.path(), "").await?;
    let file = dir.path().join("b01").join("token");
    let old = b.token().to_string();
    let new = "rotated-token-9a8b7c6d5e4f";
    let client = reqwest::Client::new();
    let status = |token: String| {
        let client = client.clone();
        let url = format!("{}/v1/status", b.url());
        async move {
            Ok::<u16, anyhow::Error>(
                client
                    .get(url)
                    .bearer_auth(token)
                    .send()
                    .await?
                    .status()
                    .as_u16(),
            )
        }
    };
    assert_eq!(status(new.into()).await?, 401);
    std::fs::write(&file, format!("{old}\n{new}\n"))?;
    wait_for(
        "the new token to be accepted",
        Duration::from_secs(20),
        || async { Ok((status(new.into()).await? == 200).then_some(())) },
    )
    .await?;
    assert_eq!(
        status(old.clone()).await?,
        200,
        "both tokens during the switch"
    );
    std::fs::write(&file, format!("{new}\n"))?;
    wait_for(
        "the old token to be refused",
        Duration::from_secs(20),
        || async { Ok((status(old.clone()).await? == 401).then_some(())) },
    )
    .await?;
    assert_eq!(status(new.into()).await?, 200);
    b.stop().await
}
