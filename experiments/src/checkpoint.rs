//! Run-folder bookkeeping shared by the training commands: atomic checkpoint folders, the
//! recorded config that a resumed run must match, and the JSON-lines metrics log.

use anyhow::{bail, Context, Result};
use dmd_models::weights::{sync_parent, write_atomic};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::Write;
use std::path::Path;

/// Reads a TOML config; a syntax error, unknown key or wrong type is one line naming the file
/// and the key (or line).
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), toml_error(&text, &e, true)))
}

/// A TOML error in one line, led by the dotted key of the line at fault (`train.batch_size:
/// invalid type: ...`) and, with `lines`, that line's number.
pub fn toml_error(text: &str, e: &toml::de::Error, lines: bool) -> String {
    let msg = e.message().trim().replace('\n', " ");
    let Some(span) = e.span().filter(|s| s.start > 0 || s.end < text.len()) else { return msg };
    let line_no = text.get(..span.start).map_or(0, |t| t.matches('\n').count()) + 1;
    let (mut table, mut key) = (String::new(), None);
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if i + 1 == line_no {
            key = t.split_once('=').filter(|_| !t.starts_with(['[', '#'])).map(|(k, _)| k.trim().trim_matches('"').to_string());
            break;
        }
        if t.starts_with('[') {
            table = t.trim_start_matches('[').split(']').next().unwrap_or("").trim().to_string();
        }
    }
    let key = key.map(|k| if table.is_empty() { k } else { format!("{table}.{k}") });
    match (key, lines) {
        (Some(k), true) => format!("{k} (line {line_no}): {msg}"),
        (Some(k), false) => format!("{k}: {msg}"),
        (None, true) => format!("line {line_no}: {msg}"),
        (None, false) => msg,
    }
}

/// Writes a checkpoint folder through `write` into `DIR.tmp`, syncs it to disk, then swaps it
/// in place of `dir`, so a crash never leaves a half-written checkpoint. The replaced one moves
/// to `DIR.history/step-NNNNNNNNN/`, which keeps the newest `keep - 1` (`keep` checkpoints in
/// all; 1: none kept besides the latest).
pub fn write_dir_atomically(dir: &Path, keep: usize, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    let old = dir.with_extension("old");
    let history = dir.with_extension("history");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| tmp.display().to_string())?;
    write(&tmp)?;
    sync_dir(&tmp).with_context(|| tmp.display().to_string())?;
    if dir.exists() {
        if keep > 1 {
            let step = checkpoint_step(dir).unwrap_or(0);
            let dest = history.join(format!("step-{step:09}"));
            std::fs::create_dir_all(&history)?;
            let _ = std::fs::remove_dir_all(&dest);
            std::fs::rename(dir, &dest)?;
        } else {
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(dir, &old)?;
        }
    }
    std::fs::rename(&tmp, dir)?;
    sync_parent(dir)?;
    let _ = std::fs::remove_dir_all(&old);
    // A prune interrupted by a crash can leave a partly deleted folder (no state.json): drop it.
    for entry in std::fs::read_dir(&history).into_iter().flatten().flatten() {
        if !entry.path().join("state.json").exists() {
            std::fs::remove_dir_all(entry.path()).with_context(|| entry.path().display().to_string())?;
        }
    }
    let mut kept = history_entries(&history);
    while kept.len() >= keep.max(1) {
        let oldest = kept.remove(0);
        std::fs::remove_dir_all(&oldest).with_context(|| oldest.display().to_string())?;
    }
    Ok(())
}

/// fsync of every file in a folder and of the folder itself.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_file() {
            std::fs::File::open(&path)?.sync_all()?;
        }
    }
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// A checkpoint folder's `state.json` and the step in it; errors name the file.
pub fn read_state(dir: &Path) -> Result<(usize, serde_json::Value)> {
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let state: serde_json::Value = serde_json::from_str(&text).with_context(|| path.display().to_string())?;
    let step = state["step"].as_u64().with_context(|| format!("{}: no `step`", path.display()))? as usize;
    Ok((step, state))
}

/// The step recorded in a checkpoint folder's `state.json` (none when it cannot be read).
pub fn checkpoint_step(dir: &Path) -> Option<usize> {
    read_state(dir).ok().map(|(step, _)| step)
}

/// The kept older checkpoints, oldest first.
fn history_entries(history: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(history)
        .map(|it| it.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join("state.json").exists()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// After a crash between the two renames of [`write_dir_atomically`], the previous checkpoint
/// is whole in `DIR.old` or is the newest of `DIR.history/`: put it back.
pub fn recover(dir: &Path) -> Result<()> {
    if dir.exists() {
        return Ok(());
    }
    let old = dir.with_extension("old");
    if old.join("state.json").exists() {
        std::fs::rename(&old, dir)?;
    } else if let Some(newest) = history_entries(&dir.with_extension("history")).pop() {
        std::fs::rename(&newest, dir)?;
    }
    Ok(())
}

/// The fields where two configs differ, as `a.b: old -> new` (dotted paths, JSON values).
pub fn config_diff<T: Serialize>(old: &T, new: &T) -> Vec<String> {
    fn walk(prefix: &str, a: Option<&serde_json::Value>, b: Option<&serde_json::Value>, out: &mut Vec<String>) {
        use serde_json::Value::Object;
        match (a, b) {
            (Some(Object(x)), Some(Object(y))) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&path, x.get(k), y.get(k), out);
                }
            }
            (a, b) if a != b => {
                let show = |v: Option<&serde_json::Value>| v.map_or("(absent)".to_string(), |v| v.to_string());
                out.push(format!("{prefix}: {} -> {}", show(a), show(b)));
            }
            _ => {}
        }
    }
    let (a, b) = (serde_json::to_value(old).ok(), serde_json::to_value(new).ok());
    let mut out = Vec::new();
    walk("", a.as_ref(), b.as_ref(), &mut out);
    out
}

/// Records `cfg` in `path`; if the folder already holds a config whose `key` (what shapes the
/// trained weights) differs, refuses to resume, naming the fields, unless `force`.
pub fn guard_config<T: Serialize + PartialEq>(path: &Path, cfg: &T, previous: Option<T>, key: impl Fn(&T) -> T, force: bool) -> Result<()> {
    if let Some(old) = previous {
        let diff = config_diff(&key(&old), &key(cfg));
        if !diff.is_empty() {
            if !force {
                bail!(
                    "{}: this run folder was started with a different config ({}); choose another out_dir, or pass --force-resume to continue it with the new one",
                    path.display(),
                    diff.join(", ")
                );
            }
            eprintln!("warning: {}: resuming with a changed config ({}) as --force-resume asks", path.display(), diff.join(", "));
        }
    }
    write_atomic(path, toml::to_string_pretty(cfg)?.as_bytes())?;
    Ok(())
}

/// Steps skipped because their loss or gradient was not finite. A run stops after `limit` in a
/// row; no checkpoint is written during such a streak, so the one kept is the last good one.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct NonFiniteGuard {
    /// Skipped steps over the whole run (kept in the checkpoint).
    pub skipped_steps: u64,
    #[serde(skip)]
    pub in_a_row: usize,
    #[serde(skip)]
    first_in_row: usize,
}

impl NonFiniteGuard {
    /// The guard of a run resumed with `skipped_steps` skipped so far.
    pub fn resumed(skipped_steps: u64) -> Self {
        Self { skipped_steps, ..Default::default() }
    }

    /// Records step `step`: `nonfinite` says which value was not finite when (part of) the step
    /// was skipped. An error once `limit` steps in a row were skipped; `last_good`: the
    /// checkpoint folder kept.
    pub fn record(&mut self, step: usize, nonfinite: Option<&str>, limit: usize, last_good: &Path) -> Result<()> {
        let Some(what) = nonfinite else {
            self.in_a_row = 0;
            return Ok(());
        };
        if self.in_a_row == 0 {
            self.first_in_row = step;
        }
        self.in_a_row += 1;
        self.skipped_steps += 1;
        if self.in_a_row >= limit {
            let at = match checkpoint_step(last_good) {
                Some(s) => format!("{} (step {s})", last_good.display()),
                None => "none written yet".to_string(),
            };
            bail!(
                "step {step}: {} steps in a row (from step {}) had a non-finite loss or gradient, the last: {what}; stopped (limit train.max_nonfinite_in_a_row = {limit}); last good checkpoint: {at}",
                self.in_a_row,
                self.first_in_row
            );
        }
        Ok(())
    }
}

/// Whether the run in `dir` is complete for `cfg`: its recorded config has the same `key`, its
/// checkpoint (`checkpoint/state.json`) is at exactly `total_steps`, and its final `output`
/// exists. A checkpoint of the same config past `total_steps` is an error (a shorter run was
/// asked of a longer one's folder).
pub fn run_finished<T: DeserializeOwned + PartialEq>(dir: &Path, cfg: &T, key: impl Fn(&T) -> T, total_steps: usize, output: &Path) -> Result<bool> {
    let checkpoint = dir.join("checkpoint");
    let (Ok(saved), true) = (std::fs::read_to_string(dir.join("config.toml")), checkpoint.join("state.json").is_file()) else {
        return Ok(false);
    };
    let same = toml::from_str::<T>(&saved).is_ok_and(|old| key(&old) == key(cfg));
    let (step, _) = read_state(&checkpoint)?;
    if same && step > total_steps {
        bail!("{}: the checkpoint is at step {step}, past train.total_steps = {total_steps}; raise total_steps or choose another out_dir", dir.display());
    }
    Ok(same && step == total_steps && output.exists())
}

pub fn append_jsonl(path: &Path, line: &serde_json::Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    writeln!(f, "{line}")?;
    Ok(())
}

/// Drops log lines past the step a run resumes from (left by an interrupted run).
pub fn truncate_jsonl(path: &Path, from_step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s as usize <= from_step))
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    write_atomic(path, out.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn save(dir: &Path, keep: usize, step: u64) {
        write_dir_atomically(dir, keep, |tmp| Ok(std::fs::write(tmp.join("state.json"), format!("{{\"step\": {step}}}"))?)).unwrap();
    }

    #[test]
    fn keeps_the_last_k_and_recovers_from_a_crash_between_renames() {
        let root = std::env::temp_dir().join(format!("dmd-ckpt-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = root.join("checkpoint");
        for step in 1..=5 {
            save(&dir, 3, step);
        }
        let history: Vec<usize> = history_entries(&dir.with_extension("history")).iter().map(|d| checkpoint_step(d).unwrap()).collect();
        assert_eq!((checkpoint_step(&dir), history), (Some(5), vec![3, 4]));
        // A prune cut short by a crash: the folder without state.json goes at the next save.
        let pruned = root.join("pruned");
        std::fs::create_dir_all(pruned.with_extension("history").join("step-000000001/part")).unwrap();
        save(&pruned, 3, 2);
        save(&pruned, 3, 3);
        assert_eq!(std::fs::read_dir(pruned.with_extension("history")).unwrap().count(), 1);
        // A crash after the latest moved to the history, before the new one moved in.
        std::fs::rename(&dir, dir.with_extension("history").join("step-000000005")).unwrap();
        std::fs::create_dir_all(dir.with_extension("tmp")).unwrap();
        recover(&dir).unwrap();
        assert_eq!(checkpoint_step(&dir), Some(5));
        // keep = 1: the replaced checkpoint goes to DIR.old, removed once the new one is in.
        let single = root.join("single");
        save(&single, 1, 1);
        save(&single, 1, 2);
        assert!(!single.with_extension("old").exists() && !single.with_extension("history").exists());
        std::fs::rename(&single, single.with_extension("old")).unwrap();
        recover(&single).unwrap();
        assert_eq!(checkpoint_step(&single), Some(2));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn config_diff_names_nested_fields() {
        let a = serde_json::json!({"train": {"lr": 1.0, "seed": 0}, "network": {"a": [1, 2]}});
        let b = serde_json::json!({"train": {"lr": 2.0, "seed": 0}, "network": {"a": [1, 3], "b": true}});
        assert_eq!(config_diff(&a, &b), vec!["network.a: [1,2] -> [1,3]", "network.b: (absent) -> true", "train.lr: 1.0 -> 2.0"]);
    }
}

/// Loads an optimiser's state from `path` into `optim`, reading the whole file now: Burn's
/// own `load` reads tensors lazily from the path, and a later checkpoint may have replaced the
/// file by then (the replicas of a data-parallel run load the checkpoint the main one rewrites).
pub fn load_optimizer(optim: crate::optim::Optim, path: &Path) -> Result<crate::optim::Optim> {
    let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
    optim.from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes)).map_err(|e| anyhow::anyhow!("{}: {e:?}", path.display()))
}
