//! Text prompts for offline text-to-image distillation: a built-in set of 320 short, original
//! COCO/LAION-style captions (`data/prompts.txt`) or a user file with one prompt per line.
//! Batches are drawn from a generator seeded by (seed, step) alone, so a resumed run draws
//! exactly the prompts the uninterrupted one would have.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;

/// The built-in prompt file, one caption per line.
pub const BUILTIN: &str = include_str!("../data/prompts.txt");

/// The RNG stream of prompt draws, distinct from the streams the experiments use for noise,
/// noise levels, dropout and data order ("prom").
const PROMPT_STREAM: u64 = 0x7072_6f6d;

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("{path}: cannot read prompt file: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: line {line} is not valid UTF-8")]
    NotUtf8 { path: String, line: usize },
    #[error("{path}: no prompts (only blank lines and `#` comments)")]
    Empty { path: String },
}

/// Mixes the run seed and the step into one generator seed (SplitMix64 finaliser): every
/// random draw of a training step comes from (seed, step, stream), so resumes repeat them.
pub fn step_seed(seed: u64, step: u64, stream: u64) -> u64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One prompt per line: trailing whitespace (and `\r`) trimmed, blank lines and lines starting
/// with `#` skipped.
fn parse_line(line: &str) -> Option<String> {
    let line = line.trim_end();
    (!line.is_empty() && !line.starts_with('#')).then(|| line.to_string())
}

/// The built-in prompts.
pub fn builtin_prompts() -> Vec<String> {
    BUILTIN.lines().filter_map(parse_line).collect()
}

/// Reads a prompt file: one prompt per line, blank lines and `#` comments skipped, trailing
/// whitespace trimmed. A leading UTF-8 byte-order mark is ignored.
pub fn read_prompts(path: &Path) -> Result<Vec<String>, PromptError> {
    let name = || path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| PromptError::Read { path: name(), source })?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let mut prompts = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = std::str::from_utf8(line).map_err(|_| PromptError::NotUtf8 { path: name(), line: i + 1 })?;
        prompts.extend(parse_line(line));
    }
    if prompts.is_empty() {
        return Err(PromptError::Empty { path: name() });
    }
    Ok(prompts)
}

/// A non-empty set of prompts to draw training batches from.
#[derive(Clone, Debug)]
pub struct PromptSet {
    prompts: Vec<String>,
}

impl PromptSet {
    /// The built-in captions (`data/prompts.txt`).
    pub fn builtin() -> Self {
        Self { prompts: builtin_prompts() }
    }

    /// The prompts of a file, as [`read_prompts`] reads them.
    pub fn from_file(path: &Path) -> Result<Self, PromptError> {
        Ok(Self { prompts: read_prompts(path)? })
    }

    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    /// Always false: a set holds at least one prompt.
    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    pub fn prompts(&self) -> &[String] {
        &self.prompts
    }

    /// `batch` prompts for training step `step` of a run seeded with `seed`: a function of
    /// (seed, step) only, so a resumed run repeats the uninterrupted one. Prompts within a batch
    /// are distinct when `batch <= len()`, drawn with replacement otherwise.
    pub fn batch(&self, step: u64, seed: u64, batch: usize) -> Vec<String> {
        let mut rng = StdRng::seed_from_u64(step_seed(seed, step, PROMPT_STREAM));
        let n = self.prompts.len();
        if batch <= n {
            rand::seq::index::sample(&mut rng, n, batch).into_iter().map(|i| self.prompts[i].clone()).collect()
        } else {
            (0..batch).map(|_| self.prompts[rng.random_range(0..n)].clone()).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::path::PathBuf;

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("dmd-prompts-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn builtin_set_is_large_unique_and_clean() {
        let p = builtin_prompts();
        assert!(p.len() >= 300, "{} prompts", p.len());
        assert_eq!(p.iter().collect::<HashSet<_>>().len(), p.len(), "duplicate prompts");
        for s in &p {
            assert!(!s.trim().is_empty());
            assert!(s.is_ascii(), "non-ASCII prompt: {s}");
            let words = s.split_whitespace().count();
            assert!((4..=16).contains(&words), "{words} words: {s}");
        }
        assert_eq!(PromptSet::builtin().len(), p.len());
    }

    #[test]
    fn read_prompts_skips_comments_and_blank_lines() {
        let path = temp_file("comments.txt", b"# header\n\na red kite   \r\n  \n#a comment\na blue boat\t\n\n");
        let p = read_prompts(&path).unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!(p, vec!["a red kite".to_string(), "a blue boat".to_string()]);
    }

    #[test]
    fn non_utf8_error_names_file_and_line() {
        let path = temp_file("latin1.txt", b"a cat\n\n# note\nna\xEFve caf\xE9\nanother\n");
        let msg = read_prompts(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).ok();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("line 4"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn missing_and_empty_files_name_the_file() {
        let missing = std::env::temp_dir().join(format!("dmd-prompts-{}-missing.txt", std::process::id()));
        let msg = PromptSet::from_file(&missing).unwrap_err().to_string();
        assert!(msg.contains(&missing.display().to_string()) && !msg.contains('\n'), "{msg}");

        let path = temp_file("empty.txt", b"# nothing here\n\n   \n");
        let msg = read_prompts(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).ok();
        assert!(msg.contains(&path.display().to_string()) && msg.contains("no prompts"), "{msg}");
    }

    #[test]
    fn batch_is_deterministic_and_steps_differ() {
        let set = PromptSet::builtin();
        assert_eq!(set.batch(5, 42, 8), set.batch(5, 42, 8));
        assert_eq!(set.batch(5, 42, 8).len(), 8);
        let batches: HashSet<Vec<String>> = (0..20).map(|s| set.batch(s, 42, 8)).collect();
        assert_eq!(batches.len(), 20, "some steps drew the same batch");
        assert_ne!(set.batch(5, 42, 8), set.batch(5, 43, 8));
        // Distinct within a batch when possible; with replacement beyond the set's size.
        let b = set.batch(3, 1, set.len());
        assert_eq!(b.iter().collect::<HashSet<_>>().len(), set.len());
        assert_eq!(set.batch(3, 1, set.len() + 7).len(), set.len() + 7);
        assert!(set.batch(3, 1, 0).is_empty());
    }
}
