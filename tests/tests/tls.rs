//! HTTPS between hq-puller and branch-listener, across real processes: a listener
//! serving a certificate of a private CA made by `deploy/make-test-ca.sh` is pulled by an
//! HQ trusting that CA (`ca_file`); an HQ trusting another CA refuses the listener with
//! a certificate error; a plain-HTTP client gets no data from the HTTPS port; the
//! listener and HQ warn about plain HTTP at start.

use anyhow::Result;
use std::time::Duration;
use tests::fleet::{BranchNode, BranchOptions, Hq, HqOptions, TlsFiles};
use tests::process::{binary, wait_for};
use tests::workload::{self, Branch, Counters};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_pull_with_a_private_ca_and_refusal_of_another_ca() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ours = TlsFiles::make(&dir.path().join("ca-ours"))?;
    let theirs = TlsFiles::make(&dir.path().join("ca-theirs"))?;
    let url = format!("sqlite://{}", dir.path().join("b01.db").display());
    let mut b = BranchNode::new(
        dir.path(),
        "b01",
        &url,
        &BranchOptions {
            tls: Some(ours.clone()),
            ..BranchOptions::default()
        },
    )?;
    b.install(true).await?;
    let sim = Branch::open(0, &b.database_url, Some(b.files_dir.clone()), 2).await?;
    workload::seed(&sim, 20, 1, &Counters::default()).await?;
    b.start().await?;
    assert!(b.url().starts_with("https://"), "{}", b.url());
    assert!(
        b.log_tail(50).contains("serving HTTPS"),
        "{}",
        b.log_tail(50)
    );

    // A plain-HTTP request to the HTTPS port gets no answer of the protocol.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/healthz", b.port))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(
        plain.map(|r| !r.status().is_success()).unwrap_or(true),
        "plain HTTP was answered on the HTTPS port"
    );

    // HQ trusting our CA: pulls over HTTPS and equals the branch.
    let hq_dir = dir.path().join("hq-ours");
    std::fs::create_dir_all(&hq_dir)?;
    let opts = HqOptions {
        extra: format!("ca_file = {:?}\n", ours.ca.display().to_string()),
        ..HqOptions::default()
    };
    let hq = Hq::new(
        &hq_dir,
        &tests::pg::fresh_database("tls_hq").await?,
        &opts,
        &[&b],
    )
    .await?;
    hq.migrate().await?;
    let out = hq.command(&["pull", "b01"]).await?;
    assert!(out.contains("b01:") && out.contains(", ok"), "{out}");
    let r = hq.compare(&b).await?;
    assert!(r.is_equal() && r.total_rows() > 0, "{r}");

    // HQ trusting another CA: the pull fails naming the certificate problem, the cursor
    // stays, the location is reported failing with that reason.
    let hq2_dir = dir.path().join("hq-theirs");
    std::fs::create_dir_all(&hq2_dir)?;
    let opts2 = HqOptions {
        extra: format!("ca_file = {:?}\n", theirs.ca.display().to_string()),
        ..HqOptions::default()
    };
    let hq2 = Hq::new(
        &hq2_dir,
        &tests::pg::fresh_database("tls_hq2").await?,
        &opts2,
        &[&b],
    )
    .await?;
    hq2.migrate().await?;
    let e = hq2.command(&["pull", "b01"]).await.unwrap_err().to_string();
    assert!(
        e.contains("certificate") && e.contains("ca_file"),
        "no clear certificate error: {e}"
    );
    assert_eq!(hq2.cursor("b01").await?, None);
    let (state, err) = hq2.location_state("b01").await?.unwrap_or_default();
    assert_eq!(state, "failing");
    assert!(err.unwrap_or_default().contains("certificate"));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM hq.products")
        .fetch_one(&hq2.pool)
        .await?;
    assert_eq!(rows, 0);
    b.stop().await?;
    Ok(())
}

/// Plain HTTP works only when allowed, and both sides warn about it at start, naming
/// the location.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_allowed_explicitly_and_warned_about() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("b01.db").display());
    let mut b = BranchNode::new(dir.path(), "b01", &url, &BranchOptions::default())?;
    b.install(true).await?;
    b.start().await?;
    let log = b.log_tail(50);
    assert!(
        log.contains("WARN") && log.contains("serving plain HTTP") && log.contains("b01"),
        "{log}"
    );
    let mut hq = Hq::new(
        dir.path(),
        &tests::pg::fresh_database("plain_hq").await?,
        &HqOptions::default(),
        &[&b],
    )
    .await?;
    hq.migrate().await?;
    hq.start()?;
    wait_for(
        "hq-puller's plain-HTTP warning",
        Duration::from_secs(30),
        || async {
            let log = hq.log_tail(50);
            Ok((log.contains("WARN")
                && log.contains("plain HTTP allowed")
                && log.contains("location=b01"))
            .then_some(()))
        },
    )
    .await?;
    hq.stop().await?;
    // Without allow_plain_http the same config does not start: exit 2, naming it.
    let text = std::fs::read_to_string(&hq.config)?.replace("allow_plain_http = true\n", "");
    std::fs::write(&hq.config, text)?;
    let out = std::process::Command::new(binary("hq-puller")?)
        .args(["--config", &hq.config.display().to_string(), "run"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("id \"b01\"") && err.contains("is plain http"),
        "{err}"
    );
    b.stop().await?;
    Ok(())
}
