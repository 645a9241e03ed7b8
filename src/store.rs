//! The folders greater writes: a run's (its configuration, one JSON line per step, an
//! atomically replaced checkpoint, its evaluations and summary), and a protocol's or
//! screening's, which hold a run folder per task. [`file`](mod@file) names every file in them.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::eval::{paired, EvalReport, Record, RecordLog};
use crate::records::{self, EvalSummary, Label, Paired, Summary};
use crate::settings::Method;

/// The names of the files greater writes into its folders, each named here once. Besides
/// these, a run holds `dev-LABEL.json` / `test-LABEL.json` (see [`RunDir::evaluation`]) and a
/// protocol or screening a run folder per task (see [`task_folder`]).
pub mod file {
    /// `config.json`: what was run: settings, model file and sha256, task, split.
    pub const CONFIG: &str = "config.json";
    /// `steps.jsonl`: one line per finished step.
    pub const STEPS: &str = "steps.jsonl";
    /// `checkpoint.json`: the state after the last finished step, replaced atomically.
    pub const CHECKPOINT: &str = "checkpoint.json";
    /// `best_prompt.txt`: the returned prompt, byte for byte.
    pub const BEST_PROMPT: &str = "best_prompt.txt";
    /// `calibration.json`: the reasoning length the step budget was estimated from.
    pub const CALIBRATION: &str = "calibration.json";
    /// `summary.json`: held-out accuracies at the end, the paired counts.
    pub const SUMMARY: &str = "summary.json";
    /// `summary.md`: the same as a table (written by `app`).
    pub const SUMMARY_MD: &str = "summary.md";
    /// `report.html`: the charts and tables of a run, protocol or screening (`greater report`).
    pub const REPORT: &str = "report.html";
    /// `protocol-config.json`: a protocol's settings, tasks and methods.
    pub const PROTOCOL_CONFIG: &str = "protocol-config.json";
    /// `progress.json`: a protocol's wall seconds on each task so far.
    pub const PROGRESS: &str = "progress.json";
    /// `protocol.json`: a protocol's table.
    pub const PROTOCOL: &str = "protocol.json";
    /// `protocol.md`: the same as Markdown.
    pub const PROTOCOL_MD: &str = "protocol.md";
    /// `screen-config.json`: a screening's base settings, tasks and configurations.
    pub const SCREEN_CONFIG: &str = "screen-config.json";
    /// `screen.json`: a screening's table.
    pub const SCREEN: &str = "screen.json";
    /// `screen.md`: the same as Markdown.
    pub const SCREEN_MD: &str = "screen.md";
    /// `.lock`: held by the process writing the folder, with its pid.
    pub const LOCK: &str = ".lock";
}

/// A run's folder: atomic JSON files, the step log, and the lock that keeps a second writer out.
pub struct RunDir {
    /// The folder.
    pub path: PathBuf,
}

/// The writer's hold on a folder, released when dropped or when the process ends (a kill
/// included: the kernel drops the lock with the process).
pub struct DirLock {
    _file: File,
}

/// Files whose presence shows a folder is greater's: the lock every folder it writes gets,
/// and the configurations of a run, a protocol and a screen.
const OWNED_MARKERS: [&str; 4] =
    [file::LOCK, file::CONFIG, file::PROTOCOL_CONFIG, file::SCREEN_CONFIG];

impl RunDir {
    /// A new run; refuses a folder that already holds one.
    pub fn create(path: &Path) -> Result<Self> {
        if path.join(file::CHECKPOINT).exists() || path.join(file::CONFIG).exists() {
            bail!(
                "{} already holds a run: continue it with --resume {0}, or choose another --out",
                path.display()
            );
        }
        Self::claim(path)
    }

    /// A folder that holds other things than one run (a protocol's parent folder).
    pub fn folder(path: &Path) -> Result<Self> {
        Self::claim(path)
    }

    /// The folder of a file the user named (`report --out FILE`): created when missing, but
    /// not claimed, since only that one file is written there.
    pub fn holding(file: &Path) -> Result<Self> {
        let path = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        fs::create_dir_all(path)
            .with_context(|| format!("cannot create folder {}", path.display()))?;
        Ok(RunDir { path: path.to_path_buf() })
    }

    /// `path` as a folder of greater's: created when missing, marked by its lock file. A
    /// link is refused rather than followed, and so is a folder holding other files and
    /// nothing of greater's, so that no run's files land among someone else's.
    fn claim(path: &Path) -> Result<Self> {
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_symlink() => {
                let target = fs::read_link(path).unwrap_or_default();
                bail!(
                    "{} is a link (to {}): pass the folder itself, so that it is plain where the files go",
                    path.display(),
                    target.display()
                );
            }
            Ok(m) if !m.is_dir() => bail!("{} is not a folder", path.display()),
            Ok(_) if OWNED_MARKERS.iter().any(|name| path.join(name).exists()) => {
                return Ok(RunDir { path: path.to_path_buf() })
            }
            Ok(_) => {
                let mut entries = fs::read_dir(path)
                    .with_context(|| format!("cannot read folder {}", path.display()))?;
                if entries.next().is_some() {
                    bail!(
                        "{} holds other files and nothing of greater's: choose a new or empty folder",
                        path.display()
                    );
                }
            }
            Err(_) => fs::create_dir_all(path)
                .with_context(|| format!("cannot create folder {}", path.display()))?,
        }
        let lock = path.join(file::LOCK);
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock)
            .with_context(|| format!("cannot create {}", lock.display()))?;
        Ok(RunDir { path: path.to_path_buf() })
    }

    /// An existing run folder.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.join(file::CONFIG).exists() {
            bail!("{} holds no run (no config.json)", path.display());
        }
        Ok(RunDir { path: path.to_path_buf() })
    }

    /// The summary of the run in `path` once it has finished (None before).
    pub fn finished_summary(path: &Path) -> Result<Option<Summary>> {
        if !path.join(file::SUMMARY).exists() {
            return Ok(None);
        }
        Ok(Some(RunDir::open(path)?.read_json(file::SUMMARY)?))
    }

    /// An advisory lock on the folder for as long as the returned guard lives: a second
    /// process that would write here refuses at once, naming the holder's pid.
    pub fn lock(&self) -> Result<DirLock> {
        self.flock(false)
    }

    /// The same lock for a short write of files several processes share (a protocol's
    /// shards): waits for the holder instead of refusing.
    pub fn lock_briefly(&self) -> Result<DirLock> {
        self.flock(true)
    }

    fn flock(&self, wait: bool) -> Result<DirLock> {
        let path = self.file(file::LOCK);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: flock on a descriptor this function owns.
            let mode = if wait { libc::LOCK_EX } else { libc::LOCK_EX | libc::LOCK_NB };
            if unsafe { libc::flock(file.as_raw_fd(), mode) } != 0 {
                let holder = fs::read_to_string(&path).unwrap_or_default();
                bail!(
                    "{} is in use by another greater process (pid {}): wait for it to end or stop it",
                    self.path.display(),
                    holder.trim()
                );
            }
        }
        file.set_len(0)?;
        write!(file, "{}", std::process::id())
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(DirLock { _file: file })
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes `name` so that a reader sees the old or the new content, never a mix.
    pub fn write_atomic(&self, name: &str, bytes: &[u8]) -> Result<()> {
        // Named by process too: shards of a protocol write the same table files at once.
        let tmp = self.file(&format!(".{name}.{}.tmp", std::process::id()));
        records::write_atomic(&tmp, &self.file(name), bytes)
    }

    /// Writes `value` as pretty JSON, atomically.
    pub fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<()> {
        self.write_atomic(name, &serde_json::to_vec_pretty(value)?)
    }

    /// Reads `name` as JSON; an error naming the file when it is missing or unreadable.
    pub fn read_json<T: DeserializeOwned>(&self, name: &str) -> Result<T> {
        let path = self.file(name);
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: unreadable", path.display()))
    }

    /// Whether the folder holds `name`.
    pub fn exists(&self, name: &str) -> bool {
        self.file(name).exists()
    }

    /// Appends one line to `steps.jsonl` and syncs it; an error naming the file.
    pub fn append_step<T: Serialize>(&self, record: &T) -> Result<()> {
        let path = self.file(file::STEPS);
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| {
                f.write_all(&line)?;
                f.sync_all()
            })
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// The step lines written so far.
    pub fn read_steps<T: DeserializeOwned>(&self) -> Result<Vec<T>> {
        Ok(self.read_lines(file::STEPS, "step")?.unwrap_or_default())
    }

    /// Every whole line of the JSON-lines file `name` (None when there is none); an error
    /// naming the file and line of an unreadable `what`. A last line without its newline is
    /// one a kill tore mid-write (every line is written with its newline at once): it is not
    /// read, and a resume cuts it.
    fn read_lines<T: DeserializeOwned>(&self, name: &str, what: &str) -> Result<Option<Vec<T>>> {
        let path = self.file(name);
        if !path.exists() {
            return Ok(None);
        }
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let whole = text.rfind('\n').map_or("", |end| &text[..end]);
        whole
            .lines()
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .with_context(|| format!("{}:{}: unreadable {what}", path.display(), i + 1))
            })
            .collect::<Result<_>>()
            .map(Some)
    }

    /// Keeps the first `n` step lines, each of which must be whole: a run killed after logging
    /// a step but before its checkpoint redoes that step on resume, and a line torn by a kill
    /// mid-write is dropped with the lines after it; a damaged line among the first `n` is an
    /// error naming it, since appending after it would leave a log no reader can use.
    pub fn truncate_steps(&self, n: usize) -> Result<()> {
        let path = self.file(file::STEPS);
        if !path.exists() {
            if n > 0 {
                bail!("{} is missing, but the checkpoint is at step {n}", path.display());
            }
            return Ok(());
        }
        let lines: Vec<String> = BufReader::new(
            File::open(&path).with_context(|| format!("cannot read {}", path.display()))?,
        )
        .lines()
        .take(n)
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot read {}", path.display()))?;
        if lines.len() < n {
            bail!(
                "{} has {} step lines, but the checkpoint is at step {n}",
                path.display(),
                lines.len()
            );
        }
        for (i, line) in lines.iter().enumerate() {
            if serde_json::from_str::<serde_json::Value>(line).is_err() {
                bail!("{}:{}: a damaged step line before the checkpoint's step {n}; the run cannot continue", path.display(), i + 1);
            }
        }
        let mut text = lines.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        self.write_atomic(file::STEPS, text.as_bytes())
    }
}

/// Evaluations kept in a run folder, so that a resumed run (or another method of a protocol)
/// measures a prompt on a split once. The folder's model and split are those of its
/// `config.json`, which a resume checks; an evaluation stands only for the prompt it measured.
impl RunDir {
    fn evaluation_file(split: &str, label: Label) -> String {
        format!("{split}-{}.json", label.file_stem())
    }

    /// The evaluation of `prompt` under `label` on `split` kept here, or else `measure`'s,
    /// which is then kept with its questions' records. `measure` logs its records as they
    /// finish, so that an evaluation interrupted part-way resumes at its next question.
    pub fn evaluation(
        &self,
        split: &str,
        label: Label,
        prompt: &str,
        measure: impl FnOnce(&mut RecordLog) -> Result<EvalReport>,
    ) -> Result<EvalSummary> {
        let file = Self::evaluation_file(split, label);
        if self.exists(&file) {
            let done: EvalSummary = self.read_json(&file)?;
            if done.prompt == prompt {
                return Ok(done);
            }
        }
        let records = self.file(&file.replace(".json", ".jsonl"));
        let mut log =
            RecordLog::open_or_restart(&records, &serde_json::json!({ "prompt": prompt }))?;
        let r = measure(&mut log)?;
        log.finish(&r.records)?;
        let summary = r.summary(label, prompt);
        self.write_json(&file, &summary)?;
        Ok(summary)
    }

    /// The question records kept here of `label`'s evaluation among a run's test
    /// `evaluations`; an evaluation that reused an earlier one of the same prompt is read from
    /// that one's records. None without them.
    pub fn test_records(
        &self,
        evaluations: &[EvalSummary],
        label: Label,
    ) -> Result<Option<Vec<Record>>> {
        let Some(e) = evaluations.iter().find(|e| e.label == label) else { return Ok(None) };
        let measured = evaluations.iter().find(|m| m.prompt == e.prompt).unwrap_or(e).label;
        let file = Self::evaluation_file("test", measured).replace(".json", ".jsonl");
        self.read_lines(&file, "question record")
    }

    /// The returned prompt of a run's test `evaluations` against `other`'s returned prompt
    /// (None: against zero-shot CoT of the same run), question by question; None without
    /// the question records.
    pub fn paired_test(
        &self,
        evaluations: &[EvalSummary],
        other: Option<(&RunDir, &[EvalSummary])>,
    ) -> Result<Option<Paired>> {
        let records = match other {
            Some((dir, evaluations)) => dir.test_records(evaluations, Label::Optimised)?,
            None => self.test_records(evaluations, Label::ZeroShotCot)?,
        };
        let (Some(returned), Some(other)) =
            (self.test_records(evaluations, Label::Optimised)?, records)
        else {
            return Ok(None);
        };
        paired(&returned, &other)
            .map(Some)
            .with_context(|| format!("test records in {}", self.path.display()))
    }

    /// Copies the dev and test evaluations of `labels` kept in `from` into this folder.
    pub fn copy_evaluations(&self, from: &RunDir, labels: &[Label]) -> Result<()> {
        for split in ["dev", "test"] {
            for &label in labels {
                let file = Self::evaluation_file(split, label);
                for name in [file.replace(".json", ".jsonl"), file] {
                    if from.exists(&name) {
                        let to = self.file(&name);
                        fs::copy(from.file(&name), &to)
                            .with_context(|| format!("cannot write {}", to.display()))?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The run folder of the `m_index`-th method on `task`: the task's folder for the first.
pub fn method_folder(task: &str, methods: &[Method], m_index: usize) -> String {
    match m_index {
        0 => task_folder(task),
        _ => format!("{}-{}", task_folder(task), methods[m_index].name()),
    }
}

/// A task's folder name: its name, or a task file's stem.
pub fn task_folder(task: &str) -> String {
    let p = Path::new(task);
    let stem = if p.extension().is_some() {
        p.file_stem().and_then(|s| s.to_str()).unwrap_or(task)
    } else {
        task
    };
    stem.replace(['/', '\\'], "_")
}
