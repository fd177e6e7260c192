//! The container image: its build context is what `.dockerignore` admits, and the crate
//! must compile from exactly that, the way the Dockerfile builds it.

use std::path::{Path, PathBuf};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The rules of `.dockerignore`: `(include, pattern)` in order; the last match wins.
fn dockerignore_rules() -> Vec<(bool, String)> {
    let text = std::fs::read_to_string(repo().join(".dockerignore")).expect("reading .dockerignore");
    let mut rules = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (include, pattern) = match line.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, line),
        };
        let pattern = pattern.trim_start_matches("./").trim_end_matches('/');
        assert!(
            pattern == "*" || !pattern.contains(['*', '?', '[']),
            ".dockerignore pattern {line:?}: this test reads only `*` and plain paths; extend it"
        );
        rules.push((include, pattern.to_string()));
    }
    rules
}

fn admitted(rules: &[(bool, String)], rel: &str) -> bool {
    let mut yes = true;
    for (include, pattern) in rules {
        if pattern == "*" || rel == pattern || rel.starts_with(&format!("{pattern}/")) {
            yes = *include;
        }
    }
    yes
}

/// Copies what the build context holds into `to`; returns the relative paths copied.
fn copy_context(from: &Path, rel: &Path, to: &Path, rules: &[(bool, String)], out: &mut Vec<String>) {
    for entry in std::fs::read_dir(from.join(rel)).expect("reading the repository") {
        let entry = entry.expect("reading a directory entry");
        let rel = rel.join(entry.file_name());
        let name = rel.to_string_lossy().to_string();
        let kind = entry.file_type().expect("file type");
        if kind.is_dir() {
            // A directory is entered if it or anything below it may be admitted.
            if admitted(rules, &name) || rules.iter().any(|(inc, p)| *inc && p.starts_with(&format!("{name}/"))) {
                copy_context(from, &rel, to, rules, out);
            }
        } else if admitted(rules, &name) {
            let dest = to.join(&rel);
            std::fs::create_dir_all(dest.parent().expect("a parent")).expect("creating a directory");
            std::fs::copy(from.join(&rel), &dest).expect("copying a file");
            out.push(name);
        }
    }
}

/// The `cargo build ...` command of the Dockerfile's build stage, as arguments after `cargo`.
fn dockerfile_cargo_args(dockerfile: &str) -> Vec<String> {
    let joined = dockerfile.replace("\\\n", " ");
    let line = joined.lines().find(|l| l.contains("cargo build")).expect("the Dockerfile runs `cargo build`");
    let from = line.find("cargo build").expect("found above") + "cargo ".len();
    line[from..].split("&&").next().expect("a command").split_whitespace().map(str::to_string).collect()
}

#[test]
fn the_docker_build_context_compiles_as_the_dockerfile_builds_it() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("reading the Dockerfile");
    let rules = dockerignore_rules();
    let context = tempfile::Builder::new().prefix("kubelock-docker-context.").tempdir().expect("a temp dir");
    let mut copied = Vec::new();
    copy_context(repo(), Path::new(""), context.path(), &rules, &mut copied);
    assert!(copied.iter().any(|p| p == "Cargo.toml"), "the context has no Cargo.toml: {copied:?}");
    // Everything the build stage COPYs is in the context.
    for line in dockerfile.lines().map(str::trim).filter(|l| l.starts_with("COPY ") && !l.contains("--from")) {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            let src = src.trim_end_matches('/');
            assert!(
                context.path().join(src).exists(),
                "the Dockerfile copies {src}, which .dockerignore leaves out of the build context"
            );
        }
    }
    // Build as the Dockerfile does, but only check (same flags, same profile).
    let mut args = dockerfile_cargo_args(&dockerfile);
    assert_eq!(args.first().map(String::as_str), Some("build"), "{args:?}");
    args[0] = "check".into();
    let target: PathBuf = repo().join("target/docker-context");
    let out = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(&args)
        .current_dir(context.path())
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("running cargo");
    assert!(
        out.status.success(),
        "`cargo {}` in the build context ({copied:?}) failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}
