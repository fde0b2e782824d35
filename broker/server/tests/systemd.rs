//! The systemd unit: it verifies, its exposure level is what
//! systemd/README.md says, its system call filter allows every call the
//! broker makes, and install.sh puts everything in place.
//!
//! Needs systemd-analyze, strace and python3; where one is missing the test
//! says so and passes, unless RSBROKER_REQUIRE_ALL is set (CI sets it).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn have(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var_os("RSBROKER_REQUIRE_ALL").is_none(),
        "missing {missing:?} (apt-get install systemd strace python3)"
    );
    eprintln!("skipped: {missing:?} not installed");
    false
}

fn tmp(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("systemd")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The unit with ExecStart pointing at the binary under test.
fn unit_for_test(dir: &Path) -> PathBuf {
    let unit = std::fs::read_to_string(repo().join("systemd/rsbroker.service")).unwrap();
    let path = dir.join("rsbroker.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/rsbroker", env!("CARGO_BIN_EXE_rsbroker")),
    )
    .unwrap();
    path
}

#[test]
fn the_unit_verifies_and_its_exposure_level_is_as_documented() {
    if !have(&["systemd-analyze"]) {
        return;
    }
    let dir = tmp("verify");
    let unit = unit_for_test(&dir);
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(repo().join("systemd/rsbroker.service"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let level: f64 = text
        .split("Overall exposure level for rsbroker.service:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    let readme = std::fs::read_to_string(repo().join("systemd/README.md")).unwrap();
    let documented: f64 = readme
        .split("exposure level at ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("systemd/README.md states the exposure level");
    assert_eq!(
        level, documented,
        "systemd/README.md states {documented}, the unit rates {level}"
    );
    assert!(
        level <= 2.0,
        "the unit should stay well hardened (OK is below 5): {text}"
    );
}

#[test]
fn the_system_call_filter_allows_every_call_the_broker_makes() {
    if !have(&["systemd-analyze", "strace", "python3"]) {
        return;
    }
    let dir = tmp("syscalls");
    let trace = dir.join("strace.txt");
    let trace_arg = trace.to_str().unwrap().to_owned();
    let mut broker =
        BrokerProcess::start_wrapped(&["strace", "-f", "-qq", "-c", "-o", &trace_arg], &[], &[]);
    let addr = broker.addr;
    let admin = broker.admin.unwrap();
    // Traffic of every kind, a scrape, a reload and a drain.
    let app = App::start(addr, "trace-1", "svc", 1, Duration::ZERO);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !http_get(admin, "/api/apps").1.contains("trace-1") {
        assert!(
            std::time::Instant::now() < deadline,
            "the app did not register"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let answers = run(move || async move {
        use rsbroker_client::metadata::route;
        use rsbroker_client::{Client, Payload};
        let c = Client::connect(addr).await.unwrap();
        let rr = c
            .request_response(Payload::new(route(&["svc.x"]), "a"))
            .await
            .is_ok();
        c.fire_and_forget(Payload::new(route(&["svc.log"]), "b"))
            .unwrap();
        let mut s = c
            .request_stream(Payload::new(route(&["svc.n"]), "3"), 8)
            .unwrap();
        let mut items = 0;
        while let Some(Ok(_)) = s.next().await {
            items += 1;
        }
        let missing = c
            .request_response(Payload::new(route(&["nope.x"]), "c"))
            .await
            .is_err();
        (rr, items, missing)
    });
    assert_eq!(answers, (true, 3, true));
    assert_eq!(http_get(admin, "/metrics").0, 200);
    broker.signal("HUP");
    broker.wait_for("configuration reloaded", Duration::from_secs(10));
    drop(app);
    broker.signal("TERM");
    let (status, lines) = broker.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{}", lines.join("\n"));
    let out = Command::new("python3")
        .arg(repo().join("systemd/check-syscalls.py"))
        .arg("trace")
        .arg(&trace)
        .arg(unit_for_test(&dir))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains("denied by the unit's filter: none"),
        "{report}"
    );
    // The check itself notices a filter without io_uring.
    let unit = std::fs::read_to_string(unit_for_test(&dir)).unwrap();
    let bad = dir.join("no-io-uring.service");
    std::fs::write(
        &bad,
        unit.replace(
            "SystemCallFilter=~@privileged",
            "SystemCallFilter=~@aio @privileged",
        ),
    )
    .unwrap();
    let out = Command::new("python3")
        .arg(repo().join("systemd/check-syscalls.py"))
        .arg("trace")
        .arg(&trace)
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("io_uring_setup"));
}

#[test]
fn install_sh_puts_binary_unit_and_config_in_place() {
    let root = tmp("install");
    let out = Command::new(repo().join("systemd/install.sh"))
        .arg(env!("CARGO_BIN_EXE_rsbroker"))
        .env("DESTDIR", &root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("OK"),
        "the config was checked"
    );
    for f in [
        "usr/local/bin/rsbroker",
        "etc/systemd/system/rsbroker.service",
        "etc/rsbroker/rsbroker.toml",
        "usr/local/share/doc/rsbroker/README.md",
    ] {
        assert!(root.join(f).is_file(), "{f} not installed");
    }
    // A second install keeps the operator's config.
    std::fs::write(
        root.join("etc/rsbroker/rsbroker.toml"),
        "[limits]\nmax_connections = 9\n",
    )
    .unwrap();
    let out = Command::new(repo().join("systemd/install.sh"))
        .arg(env!("CARGO_BIN_EXE_rsbroker"))
        .env("DESTDIR", &root)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        std::fs::read_to_string(root.join("etc/rsbroker/rsbroker.toml")).unwrap(),
        "[limits]\nmax_connections = 9\n"
    );
}
