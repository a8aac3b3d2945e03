//! Stable Diffusion v1.5's CLIP tokenizer (`tokenizer/vocab.json` + `tokenizer/merges.txt`):
//! byte-level BPE with an end-of-word suffix `</w>`, as `CLIPTokenizer` with
//! `padding="max_length"`, `truncation=True`, `max_length=77` gives it.
//!
//! Text is normalised as transformers' tokenizer does (NFC, whitespace runs to one space,
//! lowercase), split by CLIP's pattern, each piece mapped byte by byte through GPT-2's
//! `bytes_to_unicode` table and merged by the ranks of `merges.txt`.

use regex::Regex;
use std::collections::HashMap;
use std::path::Path;

/// The sequence length of SD v1.5's text encoder (`model_max_length`).
pub const MAX_LENGTH: usize = 77;

const START: &str = "<|startoftext|>";
const END: &str = "<|endoftext|>";
/// CLIP's pre-tokenizer pattern (`open_clip`'s `SimpleTokenizer`, transformers' `CLIPTokenizer`).
const PATTERN: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A tokenizer file that cannot be used: the file and what is wrong, in one line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{path}: {msg}")]
pub struct TokenizerError {
    pub path: String,
    pub msg: String,
}

pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    /// (left id, right id) -> (merge rank, merged id). All three are vocabulary entries, so
    /// BPE runs on ids without building strings.
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Id of each byte's symbol, without and with `</w>` (the last symbol of a word).
    byte_ids: [u32; 256],
    byte_end_ids: [u32; 256],
    start_id: u32,
    end_id: u32,
    pattern: Regex,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer").field("vocab", &self.vocab.len()).field("merges", &self.merges.len()).finish()
    }
}

/// GPT-2's reversible map from bytes to printable characters: printable Latin-1 bytes map to
/// themselves, the rest to U+0100 onwards in byte order.
fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut out = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        out[b as usize] = if printable(b) {
            char::from_u32(b).expect("Latin-1")
        } else {
            next += 1;
            char::from_u32(next - 1).expect("below U+0200")
        };
    }
    out
}

impl ClipTokenizer {
    /// Reads `dir/vocab.json` and `dir/merges.txt` (the diffusers `tokenizer/` folder).
    pub fn load(dir: &Path) -> Result<Self, TokenizerError> {
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        let verr = |msg: String| TokenizerError { path: vocab_path.display().to_string(), msg };
        let text = std::fs::read_to_string(&vocab_path).map_err(|e| verr(e.to_string()))?;
        let vocab: HashMap<String, u32> =
            serde_json::from_str(&text).map_err(|e| verr(format!("not a JSON object of token -> id: {}", e.to_string().replace('\n', " "))))?;
        // The ids number the tokens (0..49408 in SD v1.5): the text encoder's embedding table
        // is sized by that count, so an id beyond it would index past the table.
        if let Some((tok, i)) = vocab.iter().filter(|(_, &i)| i as usize >= vocab.len()).min_by_key(|(_, &i)| i) {
            return Err(verr(format!("token `{}` has id {i}, but ids must lie below the number of tokens, {}", tok.escape_debug(), vocab.len())));
        }
        let id = |tok: &str| vocab.get(tok).copied();
        let start_id = id(START).ok_or_else(|| verr(format!("no token `{START}`")))?;
        let end_id = id(END).ok_or_else(|| verr(format!("no token `{END}`")))?;
        let table = bytes_to_unicode();
        let (mut byte_ids, mut byte_end_ids) = ([0u32; 256], [0u32; 256]);
        for b in 0..256 {
            let c = table[b].to_string();
            byte_ids[b] = id(&c).ok_or_else(|| verr(format!("no token `{c}` (byte 0x{b:02x})")))?;
            let c = format!("{c}</w>");
            byte_end_ids[b] = id(&c).ok_or_else(|| verr(format!("no token `{c}` (byte 0x{b:02x})")))?;
        }

        let merr = |msg: String| TokenizerError { path: merges_path.display().to_string(), msg };
        let text = std::fs::read_to_string(&merges_path).map_err(|e| merr(e.to_string()))?;
        let mut merges = HashMap::new();
        let mut rank = 0u32;
        for (i, line) in text.lines().enumerate() {
            if (i == 0 && line.starts_with("#version")) || line.is_empty() {
                continue;
            }
            let line_err = |what: String| merr(format!("line {}: {what}", i + 1));
            let Some((a, b)) = line.split_once(' ').filter(|(a, b)| !a.is_empty() && !b.is_empty() && !b.contains(' ')) else {
                return Err(line_err(format!("expected two tokens separated by one space, found `{line}`")));
            };
            let lookup = |t: &str| id(t).ok_or_else(|| line_err(format!("token `{t}` is not in vocab.json")));
            let (ia, ib, merged) = (lookup(a)?, lookup(b)?, lookup(&format!("{a}{b}"))?);
            // A repeated pair takes its last rank, as the reference implementations' maps do.
            merges.insert((ia, ib), (rank, merged));
            rank += 1;
        }
        let pattern = Regex::new(PATTERN).expect("CLIP's pattern compiles");
        Ok(Self { vocab, merges, byte_ids, byte_end_ids, start_id, end_id, pattern })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// `<|startoftext|>`'s id (49406 in SD v1.5).
    pub fn start_id(&self) -> u32 {
        self.start_id
    }

    /// `<|endoftext|>`'s id (49407), which is also the padding token.
    pub fn end_id(&self) -> u32 {
        self.end_id
    }

    /// The BPE ids of `text`, without start/end tokens, padding or truncation.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let text = normalize(text);
        let mut out = Vec::new();
        for piece in self.pattern.find_iter(&text) {
            match piece.as_str() {
                START => out.push(self.start_id),
                END => out.push(self.end_id),
                word => self.bpe(word.as_bytes(), &mut out),
            }
        }
        out
    }

    /// Exactly [`MAX_LENGTH`] ids: start, at most 75 BPE ids, end, then end tokens as padding.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(MAX_LENGTH);
        ids.push(self.start_id);
        ids.extend(self.tokenize(text).into_iter().take(MAX_LENGTH - 2));
        // At most 76 ids so far: the end token follows, then padding (also the end token).
        ids.resize(MAX_LENGTH, self.end_id);
        ids
    }

    /// [`ClipTokenizer::encode`] of each text: [texts.len()][MAX_LENGTH].
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S]) -> Vec<Vec<u32>> {
        texts.iter().map(|t| self.encode(t.as_ref())).collect()
    }

    /// Byte-level BPE of one pre-tokenised word, its ids appended to `out`.
    ///
    /// The reference loop (find the lowest-ranked adjacent pair, merge its every occurrence
    /// left to right, repeat) rescans the whole word per merge: quadratic, 10 s for a 100 KB
    /// word. Here the pairs wait in a heap by (rank, position) over a linked list of symbols,
    /// and each rank's occurrences are merged in one pass before the pairs they create join
    /// the heap, so the result is the reference loop's for any merges table, in O(n log n).
    fn bpe(&self, word: &[u8], out: &mut Vec<u32>) {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let Some((&last, init)) = word.split_last() else { return };
        let mut symbols: Vec<u32> = init.iter().map(|&b| self.byte_ids[b as usize]).collect();
        symbols.push(self.byte_end_ids[last as usize]);
        let n = symbols.len();
        // Neighbours of each live symbol (n: none); a merge keeps the left position.
        let mut prev: Vec<usize> = (0..n).map(|i| if i == 0 { n } else { i - 1 }).collect();
        let mut next: Vec<usize> = (1..=n).collect();
        let mut alive = vec![true; n];
        // (rank, left position, left id, right id); an entry whose symbols changed is stale.
        let mut heap = BinaryHeap::new();
        let pair_at = |symbols: &[u32], i: usize, j: usize| self.merges.get(&(symbols[i], symbols[j])).map(|&(rank, _)| Reverse((rank, i, symbols[i], symbols[j])));
        heap.extend((0..n.saturating_sub(1)).filter_map(|i| pair_at(&symbols, i, i + 1)));
        let mut merged_at = Vec::new();
        while let Some(&Reverse((rank, ..))) = heap.peek() {
            merged_at.clear();
            while let Some(Reverse((r, i, a, b))) = heap.peek().copied() {
                if r != rank {
                    break;
                }
                heap.pop();
                let j = next[i];
                if !alive[i] || j >= n || symbols[i] != a || symbols[j] != b {
                    continue;
                }
                symbols[i] = self.merges[&(a, b)].1;
                alive[j] = false;
                next[i] = next[j];
                if next[j] < n {
                    prev[next[j]] = i;
                }
                merged_at.push(i);
            }
            for &i in &merged_at {
                if !alive[i] {
                    continue;
                }
                if prev[i] < n {
                    heap.extend(pair_at(&symbols, prev[i], i));
                }
                if next[i] < n {
                    heap.extend(pair_at(&symbols, i, next[i]));
                }
            }
        }
        let mut i = 0;
        while i < n {
            out.push(symbols[i]);
            i = next[i];
        }
    }
}

/// transformers' normaliser for CLIP: NFC, every whitespace run to one space, lowercase.
/// NFC is approximated (no normalisation crate in the tree): a Latin letter followed by one
/// combining mark becomes the precomposed Latin-1 / Latin Extended-A letter, which covers
/// decomposed Western and Central European text; other sequences are left as they are.
fn normalize(text: &str) -> String {
    let mut composed = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match chars.peek().and_then(|&m| compose(c, m)) {
            Some(p) => {
                composed.push(p);
                chars.next();
            }
            None => composed.push(c),
        }
    }
    composed.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// Canonical composition of an ASCII letter and a combining mark, within U+00C0..U+017F.
fn compose(base: char, mark: char) -> Option<char> {
    const TABLE: [(char, &str, &str); 13] = [
        ('\u{0300}', "AEIOUaeiou", "ÀÈÌÒÙàèìòù"),
        ('\u{0301}', "AEIOUYaeiouyCcLlNnRrSsZz", "ÁÉÍÓÚÝáéíóúýĆćĹĺŃńŔŕŚśŹź"),
        ('\u{0302}', "AEIOUaeiouCcGgHhJjSsWwYy", "ÂÊÎÔÛâêîôûĈĉĜĝĤĥĴĵŜŝŴŵŶŷ"),
        ('\u{0303}', "ANOanoIiUu", "ÃÑÕãñõĨĩŨũ"),
        ('\u{0304}', "AaEeIiOoUu", "ĀāĒēĪīŌōŪū"),
        ('\u{0306}', "AaEeGgIiOoUu", "ĂăĔĕĞğĬĭŎŏŬŭ"),
        ('\u{0307}', "CcEeGgIZz", "ĊċĖėĠġİŻż"),
        ('\u{0308}', "AEIOUaeiouyY", "ÄËÏÖÜäëïöüÿŸ"),
        ('\u{030a}', "AaUu", "ÅåŮů"),
        ('\u{030b}', "OoUu", "ŐőŰű"),
        ('\u{030c}', "CcDdEeLlNnRrSsTtZz", "ČčĎďĚěĽľŇňŘřŠšŤťŽž"),
        ('\u{0327}', "CcGgKkLlNnRrSsTt", "ÇçĢģĶķĻļŅņŖŗŞşŢţ"),
        ('\u{0328}', "AaEeIiUu", "ĄąĘęĮįŲų"),
    ];
    if !base.is_ascii_alphabetic() {
        return None;
    }
    let (_, bases, composed) = TABLE.iter().find(|(m, _, _)| *m == mark)?;
    let i = bases.chars().position(|b| b == base)?;
    composed.chars().nth(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection_onto_printables() {
        let t = bytes_to_unicode();
        let mut seen: Vec<char> = t.to_vec();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 256);
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], '\u{120}');
    }

    #[test]
    fn normalisation() {
        assert_eq!(normalize("  Cafe\u{301}\t\n DÉJÀ  "), "café déjà");
        assert_eq!(normalize("a\u{2003}b"), "a b");
    }

    /// The reference loop [`ClipTokenizer::bpe`] must agree with.
    fn bpe_passes(tok: &ClipTokenizer, word: &[u8], out: &mut Vec<u32>) {
        let Some((&last, init)) = word.split_last() else { return };
        let mut symbols: Vec<u32> = init.iter().map(|&b| tok.byte_ids[b as usize]).collect();
        symbols.push(tok.byte_end_ids[last as usize]);
        loop {
            // The lowest-ranked adjacent pair; then every occurrence of it, left to right.
            let best = symbols
                .windows(2)
                .filter_map(|w| tok.merges.get(&(w[0], w[1])).map(|&(rank, merged)| (rank, w[0], w[1], merged)))
                .min_by_key(|m| m.0);
            let Some((_, a, b, merged)) = best else { break };
            let mut next = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && symbols[i] == a && symbols[i + 1] == b {
                    next.push(merged);
                    i += 2;
                } else {
                    next.push(symbols[i]);
                    i += 1;
                }
            }
            symbols = next;
        }
        out.extend(symbols);
    }

    #[test]
    fn heap_bpe_equals_the_reference_loop() {
        // Merges over a three-letter alphabet interact a lot: many ranks per word, repeated
        // letters, merges whose products pair again (also at lower ranks than their parents).
        let dir = std::env::temp_dir().join(format!("dmd-bpe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let table = bytes_to_unicode();
        let mut vocab: Vec<String> = table.iter().map(|c| c.to_string()).collect();
        vocab.extend(table.iter().map(|c| format!("{c}</w>")));
        let merges = ["ab a", "aa a", "a a", "b a", "c c</w>", "a b", "a a</w>", "ba a", "b b", "aa aa", "c a", "ab ab", "a c", "bb a</w>", "ca b", "aba a"];
        for m in merges {
            let t = m.replace(' ', "");
            if !vocab.contains(&t) {
                vocab.push(t);
            }
        }
        vocab.extend([START.to_string(), END.to_string()]);
        let json: HashMap<&String, usize> = vocab.iter().enumerate().map(|(i, t)| (t, i)).collect();
        std::fs::write(dir.join("vocab.json"), serde_json::to_string(&json).unwrap()).unwrap();
        std::fs::write(dir.join("merges.txt"), format!("#version: 0.2\n{}\n", merges.join("\n"))).unwrap();
        let mut tokenizers = vec![ClipTokenizer::load(&dir).unwrap()];
        std::fs::remove_dir_all(&dir).ok();
        // And SD v1.5's real tokenizer when the reference folder is there.
        let real = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference/sd/tokenizer");
        tokenizers.extend(ClipTokenizer::load(&real).ok());
        let mut x: u64 = 7;
        let mut rand = |k: u64| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) % k
        };
        for tok in &tokenizers {
            for _ in 0..3000 {
                let len = 1 + rand(40) as usize;
                let alphabet: &[u8] = if rand(2) == 0 { b"abc" } else { b"abcdefghijklmnopqrstuvwxyz" };
                let word: Vec<u8> = (0..len).map(|_| alphabet[rand(alphabet.len() as u64) as usize]).collect();
                let (mut fast, mut slow) = (Vec::new(), Vec::new());
                tok.bpe(&word, &mut fast);
                bpe_passes(tok, &word, &mut slow);
                assert_eq!(fast, slow, "{}", String::from_utf8_lossy(&word));
            }
        }
    }
}
