//! Malformed inputs, one of each kind of fault (configs, weights and checkpoints, datasets,
//! latents, network configs, FID statistics, teacher pairs): `dmd` must refuse every one with a
//! single `error:` line that names the file and the key, tensor or record at fault, without a
//! panic, and without writing anything. The corpus and what each case must say are in
//! tests/data/malformed/ (`cases.toml` describes the format).

mod common;

use common::scratch;
use std::path::{Path, PathBuf};
use std::process::Command;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/malformed")
}

struct Case {
    name: String,
    args: Vec<String>,
    needles: Vec<String>,
    /// Paths (relative to the corpus copy, or with `{out}`) that must not exist afterwards.
    absent: Vec<String>,
    /// Files of the corpus copy that must still equal the committed ones.
    unchanged: Vec<String>,
}

fn strings(case: &toml::Table, key: &str, default: &[&str]) -> Vec<String> {
    match case.get(key) {
        None => default.iter().map(|s| s.to_string()).collect(),
        Some(v) => v
            .as_array()
            .unwrap_or_else(|| panic!("cases.toml: `{key}` must be a list"))
            .iter()
            .map(|s| s.as_str().unwrap_or_else(|| panic!("cases.toml: `{key}` must list strings")).to_string())
            .collect(),
    }
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(corpus().join("cases.toml")).unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap();
    let list = table["case"].as_array().expect("[[case]] entries");
    list.iter()
        .map(|c| {
            let c = c.as_table().expect("a [[case]] table");
            for key in c.keys() {
                assert!(["name", "args", "needles", "absent", "unchanged"].contains(&key.as_str()), "cases.toml: unknown key `{key}`");
            }
            Case {
                name: c["name"].as_str().expect("name").to_string(),
                args: strings(c, "args", &[]),
                needles: strings(c, "needles", &[]),
                absent: strings(c, "absent", &["{out}"]),
                unchanged: strings(c, "unchanged", &[]),
            }
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let p = entry.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

/// What is wrong with how `dmd` handled the case (empty: all good).
fn check(case: &Case, copy: &Path, out: &Path) -> Vec<String> {
    let sub = |s: &str| s.replace("{out}", out.to_str().unwrap());
    let args: Vec<String> = case.args.iter().map(|a| sub(a)).collect();
    let o = Command::new(env!("CARGO_BIN_EXE_dmd")).args(&args).current_dir(copy).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    let mut problems = Vec::new();
    if o.status.success() {
        problems.push("exited with status 0".to_string());
    }
    let lines: Vec<&str> = err.lines().collect();
    if lines.len() != 1 {
        problems.push(format!("{} lines on stderr instead of one", lines.len()));
    }
    if !err.starts_with("error: ") {
        problems.push("stderr does not start with `error: `".into());
    }
    for bad in ["internal error", "panicked"] {
        if err.contains(bad) {
            problems.push(format!("a panic (`{bad}`)"));
        }
    }
    for n in &case.needles {
        if !err.contains(n.as_str()) {
            problems.push(format!("does not say `{n}`"));
        }
    }
    for a in &case.absent {
        let p = copy.join(sub(a)); // an absolute path replaces the base
        if p.exists() {
            problems.push(format!("wrote {}", p.display()));
        }
    }
    for u in &case.unchanged {
        if std::fs::read(copy.join(u)).ok() != std::fs::read(corpus().join(u)).ok() {
            problems.push(format!("changed {u}"));
        }
    }
    if !problems.is_empty() {
        problems.push(format!("\n    command: dmd {}\n    stderr: {}", args.join(" "), err.trim_end().replace('\n', "\n            ")));
    }
    problems
}

#[test]
fn malformed_inputs_give_one_line_errors_naming_file_and_key_and_write_nothing() {
    let cases = cases();
    assert!(cases.len() >= 34, "the corpus has {} cases", cases.len());
    let mut names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), cases.len(), "case names must be distinct");
    for c in &cases {
        assert!(!c.args.is_empty() && !c.needles.is_empty(), "{}: needs args and needles", c.name);
    }

    // The commands run in a copy: a resumed run may rewrite its folder, and nothing may touch
    // the committed corpus.
    let tmp = scratch("malformed_inputs");
    let copy = tmp.join("corpus");
    copy_dir(&corpus(), &copy);
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|c| {
            let problems = check(c, &copy, &tmp.join("out").join(&c.name));
            (!problems.is_empty()).then(|| format!("{}: {}", c.name, problems.join("; ")))
        })
        .collect();
    assert!(failures.is_empty(), "{} of {} malformed inputs were not refused as they should be:\n{}", failures.len(), cases.len(), failures.join("\n"));
}
