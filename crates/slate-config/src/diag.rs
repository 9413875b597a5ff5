//! Diagnostics that point into the config file.

use std::fmt;
use std::path::PathBuf;

/// One problem in a config file, located by line and column (both 1-based).
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub path: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
    pub hint: Option<String>,
    /// The offending source line, for display.
    pub source_line: String,
}

impl Diagnostic {
    pub fn at(path: &std::path::Path, src: &str, offset: usize, message: String) -> Self {
        let offset = offset.min(src.len());
        let before = &src[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        let col = before[line_start..].chars().count() + 1;
        let source_line = src[line_start..].lines().next().unwrap_or("").to_string();
        Diagnostic {
            path: path.to_path_buf(),
            line,
            col,
            message,
            hint: None,
            source_line,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.path.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no `slate.toml` in `{dir}` or any folder above it")]
    NotFound { dir: PathBuf },
    #[error("cannot read `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", first_line(.0))]
    Invalid(Vec<Diagnostic>),
}

fn first_line(d: &[Diagnostic]) -> String {
    match d {
        [one] => one.to_string(),
        [first, ..] => format!("{first} (and {} more problems)", d.len() - 1),
        [] => "invalid config".into(),
    }
}

/// The closest candidate to `word`, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (levenshtein(word, c), c))
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = if ca == *cb { 0 } else { 1 };
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_line_and_column() {
        let src = "a = 1\nbb = 2\n";
        let d = Diagnostic::at(std::path::Path::new("x.toml"), src, 9, "m".into());
        assert_eq!((d.line, d.col), (2, 4));
        assert_eq!(d.source_line, "bb = 2");
        assert_eq!(d.to_string(), "x.toml:2:4: m");
    }

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(
            did_you_mean("pakages", ["packages", "steps"]),
            Some("packages")
        );
        assert_eq!(did_you_mean("zzz", ["packages", "steps"]), None);
    }
}
