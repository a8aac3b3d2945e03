//! Run-folder bookkeeping shared by the training commands: atomic checkpoint folders, the
//! recorded config that a resumed run must match, and the JSON-lines metrics log.

use anyhow::{bail, Context, Result};
use dmd_models::weights::write_atomic;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::Write;
use std::path::Path;

/// Reads a TOML config; a syntax error or unknown key is one line naming the file.
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))
}

/// Writes a checkpoint folder through `write` into `DIR.tmp`, then swaps it in place of `dir`,
/// so a crash never leaves a half-written checkpoint.
pub fn write_dir_atomically(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    let old = dir.with_extension("old");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    write(&tmp)?;
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(dir, &old)?;
    }
    std::fs::rename(&tmp, dir)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// After a crash between the two renames of [`write_dir_atomically`], the previous checkpoint
/// is whole in `DIR.old`: put it back.
pub fn recover(dir: &Path) -> Result<()> {
    let old = dir.with_extension("old");
    if !dir.exists() && old.join("state.json").exists() {
        std::fs::rename(&old, dir)?;
    }
    Ok(())
}

/// Records `cfg` in `path`; if the folder already holds a config whose `key` differs (what
/// shapes the trained weights), refuses to resume.
pub fn guard_config<T: Serialize + PartialEq>(path: &Path, cfg: &T, previous: Option<T>, key: impl Fn(&T) -> T) -> Result<()> {
    if let Some(old) = previous {
        if key(&old) != key(cfg) {
            bail!("{}: this run folder was started with a different config; choose another out_dir or delete the folder", path.display());
        }
    }
    write_atomic(path, toml::to_string_pretty(cfg)?.as_bytes())?;
    Ok(())
}

/// Whether the run in `dir` is complete for `cfg`: its recorded config has the same `key`, its
/// checkpoint (`checkpoint/state.json`) is at exactly `total_steps`, and its final `output`
/// exists. A checkpoint of the same config past `total_steps` is an error (a shorter run was
/// asked of a longer one's folder).
pub fn run_finished<T: DeserializeOwned + PartialEq>(dir: &Path, cfg: &T, key: impl Fn(&T) -> T, total_steps: usize, output: &Path) -> Result<bool> {
    let state_path = dir.join("checkpoint").join("state.json");
    let (Ok(saved), Ok(state)) = (std::fs::read_to_string(dir.join("config.toml")), std::fs::read_to_string(&state_path)) else {
        return Ok(false);
    };
    let same = toml::from_str::<T>(&saved).is_ok_and(|old| key(&old) == key(cfg));
    let state: serde_json::Value = serde_json::from_str(&state).with_context(|| state_path.display().to_string())?;
    let step = state["step"].as_u64().with_context(|| format!("{}: no step", state_path.display()))? as usize;
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
