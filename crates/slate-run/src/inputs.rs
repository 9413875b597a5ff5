//! Which host files are a target's inputs: `.gitignore` and `exclude` honoured,
//! slate's own folders never included. The host tree is only read.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("bad `exclude` pattern `{pattern}`")]
    Pattern {
        pattern: String,
        #[source]
        source: ignore::Error,
    },
    #[error("cannot read input `{path}`")]
    Walk {
        path: PathBuf,
        #[source]
        source: ignore::Error,
    },
}

/// An input root and the entries under it, relative to it.
pub struct InputSet {
    pub base: PathBuf,
    pub entries: Vec<PathBuf>,
}

/// Lists `input` (a folder or a file). `skip` are absolute paths never copied.
pub fn collect(input: &Path, exclude: &[String], skip: &[PathBuf]) -> Result<InputSet, InputError> {
    if input.is_file() {
        let base = input.parent().unwrap_or(Path::new("/")).to_path_buf();
        return Ok(InputSet {
            base,
            entries: vec![PathBuf::from(input.file_name().unwrap_or_default())],
        });
    }
    let mut ob = ignore::overrides::OverrideBuilder::new(input);
    for pat in exclude
        .iter()
        .map(String::as_str)
        .chain([".git/", ".slate/"])
    {
        ob.add(&format!("!{pat}"))
            .map_err(|source| InputError::Pattern {
                pattern: pat.to_string(),
                source,
            })?;
    }
    let overrides = ob.build().map_err(|source| InputError::Pattern {
        pattern: exclude.join(" "),
        source,
    })?;
    let walker = ignore::WalkBuilder::new(input)
        .hidden(false)
        .git_ignore(true)
        .git_global(false)
        .git_exclude(true)
        .require_git(false)
        .parents(false)
        .ignore(false)
        .overrides(overrides)
        .sort_by_file_path(|a, b| a.cmp(b))
        // slate's own folders are pruned, not walked: other targets of the
        // same run write and rename there while this walk runs.
        .filter_entry({
            let skip = skip.to_vec();
            move |e| !skip.iter().any(|s| e.path().starts_with(s))
        })
        .build();
    let mut entries = Vec::new();
    for e in walker {
        let e = match e {
            Ok(e) => e,
            // A file removed while the tree is walked is not an input.
            Err(err)
                if err
                    .io_error()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound) =>
            {
                continue
            }
            Err(source) => {
                return Err(InputError::Walk {
                    path: input.to_path_buf(),
                    source,
                })
            }
        };
        let p = e.path();
        if let Ok(rel) = p.strip_prefix(input) {
            if !rel.as_os_str().is_empty() {
                entries.push(rel.to_path_buf());
            }
        }
    }
    Ok(InputSet {
        base: input.to_path_buf(),
        entries,
    })
}

/// A digest of the input tree: paths, kinds, modes and contents, in order.
pub fn digest(sets: &[InputSet]) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::PermissionsExt;
    let mut h = Sha256::new();
    for set in sets {
        for rel in &set.entries {
            let p = set.base.join(rel);
            let m = fs_err::symlink_metadata(&p)?;
            h.update(rel.to_string_lossy().as_bytes());
            h.update([0]);
            if m.file_type().is_symlink() {
                h.update(b"l\0");
                h.update(fs_err::read_link(&p)?.to_string_lossy().as_bytes());
            } else if m.is_dir() {
                h.update(b"d\0");
            } else {
                h.update(format!("f\0{:o}\0", m.permissions().mode() & 0o7777).as_bytes());
                std::io::copy(&mut std::fs::File::open(&p)?, &mut h)?;
            }
            h.update([0]);
        }
    }
    Ok(slate_layers::hash::hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn honours_gitignore_exclude_and_skips() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        for f in [
            "src/main.c",
            "target/big",
            "build/out.o",
            "notes.txt",
            ".slate/runs/x",
            "artifacts/a",
        ] {
            std::fs::create_dir_all(d.join(f).parent().unwrap()).unwrap();
            std::fs::write(d.join(f), "x").unwrap();
        }
        std::fs::write(d.join(".gitignore"), "build/\n").unwrap();
        let set = collect(
            d,
            &["target/".into(), "*.txt".into()],
            &[d.join("artifacts")],
        )
        .unwrap();
        let names: Vec<String> = set
            .entries
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        assert_eq!(names, [".gitignore", "src", "src/main.c"]);
        let d1 = digest(std::slice::from_ref(&set)).unwrap();
        std::fs::write(d.join("build/out.o"), "ignored files do not count").unwrap();
        assert_eq!(
            digest(&[collect(
                d,
                &["target/".into(), "*.txt".into()],
                &[d.join("artifacts")]
            )
            .unwrap()])
            .unwrap(),
            d1
        );
        std::fs::write(d.join("src/main.c"), "y").unwrap();
        assert_ne!(
            digest(&[collect(
                d,
                &["target/".into(), "*.txt".into()],
                &[d.join("artifacts")]
            )
            .unwrap()])
            .unwrap(),
            d1
        );
    }
}
