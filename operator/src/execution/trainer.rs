//! Local `heterotune-trainer` processes: init, train and evaluate (one per
//! client, in the background) and aggregate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::protocol::store::{ACCESS_KEY_ENV, SECRET_KEY_ENV};
use heterotune_crds::layout::{latest_state_before, state_file_name};
use tokio::sync::{mpsc, oneshot};

/// How to invoke the trainer binary.
#[derive(Debug, Clone)]
pub struct TrainerCommand {
    /// The `heterotune-trainer` binary.
    pub binary: PathBuf,
    /// The validated spec (JSON, defaults applied).
    pub spec: PathBuf,
    /// libtorch threads per process.
    pub threads: usize,
    /// The run directory (written into manifests; checked by the aggregator).
    pub run: String,
    /// The `HETEROTUNE_STAGED` file listing staged `s3://` inputs, if any.
    pub staged: Option<PathBuf>,
    /// Also pass the trainer's log (stderr) through live, line by line
    /// (pods: `kubectl logs` shows it); its tail is in errors either way.
    pub live_logs: bool,
    /// Let `dtype: auto` time a GEMM on this CPU and keep the timing in the
    /// machine's cache (`heterotune_crds::dtype::TIMING_ENV`): for trainers
    /// of one machine with a lasting cache (`heterotune run`, `heterotune
    /// site`), not for pods, which decide by the CPU's flags.
    pub time_cpu_dtype: bool,
}

/// A client's local folders for one round.
#[derive(Debug, Clone)]
pub struct ClientDirs {
    /// Where the trainer writes the artifact before it is uploaded.
    pub out: PathBuf,
    /// The private state after the previous round (absent in round 1).
    pub state_in: Option<PathBuf>,
    /// The private state after this round.
    pub state_out: PathBuf,
    /// Frozen-prefix caches, shared by every client of the run (fingerprinted).
    pub cache: PathBuf,
    /// The trainer's log of this attempt.
    pub log: PathBuf,
}

impl ClientDirs {
    /// The folders of `client` in `round` under the run's work folder. The
    /// private state comes from the newest round before this one that the
    /// client finished (it may have been excluded from the last one).
    pub fn new(work: &Path, client: &str, round: u32) -> Self {
        let base = work.join("clients").join(client);
        let state_dir = base.join("state");
        let names: Vec<String> = std::fs::read_dir(&state_dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let previous = latest_state_before(names.iter().map(String::as_str), round)
            .map(|(_, name)| state_dir.join(name));
        // A fresh folder per attempt: a trainer orphaned by a killed runner
        // can never write into the folder of the attempt that replaces it.
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        ClientDirs {
            out: base.join(format!("round-{round:04}.{}-{nonce}", std::process::id())),
            state_in: previous.filter(|p| p.is_file()),
            state_out: state_dir.join(state_file_name(round)),
            cache: work.join("prefix-cache"),
            log: base.join(format!("round-{round:04}.log")),
        }
    }
}

/// A finished trainer process.
#[derive(Debug)]
pub struct ClientExit {
    pub client: String,
    pub round: u32,
    /// It evaluated the global model of `round` (else it trained in `round`).
    pub evaluation: bool,
    pub ok: bool,
    /// The artifact folder (training) or the result file (evaluation).
    pub out_dir: PathBuf,
    /// A one-line summary (metrics on success, the error's last lines on failure).
    pub summary: String,
    /// Wall seconds from the process's start to its end.
    pub seconds: f64,
}

impl ClientExit {
    /// The exit of a process not finished yet (filled in when it ends).
    fn pending(client: &str, round: u32, evaluation: bool, out: &Path) -> Self {
        ClientExit {
            client: client.to_string(),
            round,
            evaluation,
            ok: false,
            out_dir: out.to_path_buf(),
            summary: String::new(),
            seconds: f64::NAN,
        }
    }
}

/// Running trainers, by client; dropping or killing one stops its process.
#[derive(Default)]
pub struct Children {
    running: BTreeMap<String, oneshot::Sender<()>>,
}

impl Children {
    /// Number of running trainers.
    pub fn len(&self) -> usize {
        self.running.len()
    }
    /// Whether no trainer runs.
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }
    pub fn insert(&mut self, client: String, cancel: oneshot::Sender<()>) {
        self.running.insert(client, cancel);
    }
    pub fn remove(&mut self, client: &str) {
        self.running.remove(client);
    }
    pub fn kill(&mut self, client: &str) {
        if let Some(cancel) = self.running.remove(client) {
            let _ = cancel.send(());
        }
    }
    pub fn kill_all(&mut self) {
        let names: Vec<String> = self.running.keys().cloned().collect();
        for n in names {
            self.kill(&n);
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// Lines of a trainer's log kept for its error message.
const KEPT_LOG_LINES: usize = 20;

/// Runs `cmd` to its end; its stdout on success. A failure says what
/// failed, with the last lines of the trainer's log (stderr, credentials
/// redacted: [`heterotune_crds::redact`]). With `live`
/// the log also streams through to this process's stderr line by line (a
/// pod's `kubectl logs`), and the error still carries its tail: the
/// aggregation's "quorum not met: … rejected …" line is what the caller
/// reads to set rejected artifacts aside.
async fn run_to_end(
    mut cmd: tokio::process::Command,
    what: &str,
    live: bool,
) -> Result<String, String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{what}: cannot start the trainer: {e}"))?;
    let mut stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let read_stdout = async {
        let mut text = String::new();
        if let Some(out) = stdout.as_mut() {
            let _ = out.read_to_string(&mut text).await;
        }
        text
    };
    // The last lines only: a long log is not held in memory.
    let read_stderr = async {
        let mut kept = std::collections::VecDeque::with_capacity(KEPT_LOG_LINES);
        if let Some(err) = stderr {
            // Bytes, not `lines()`: a line that is not UTF-8 must not stop
            // the reading (the trainer would block on a full pipe).
            let mut reader = BufReader::new(err);
            let mut buf = Vec::new();
            while reader
                .read_until(b'\n', &mut buf)
                .await
                .is_ok_and(|n| n > 0)
            {
                let line = String::from_utf8_lossy(&buf);
                let line = heterotune_crds::redact::credentials(line.trim_end()).into_owned();
                buf.clear();
                if live {
                    eprintln!("{line}");
                }
                if kept.len() == KEPT_LOG_LINES {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
        }
        Vec::from(kept).join("\n")
    };
    let (stdout, stderr) = tokio::join!(read_stdout, read_stderr);
    let status = child
        .wait()
        .await
        .map_err(|e| format!("{what}: the trainer process: {e}"))?;
    if status.success() {
        Ok(stdout)
    } else {
        Err(format!("{what} failed ({status}): {}", tail(&stderr, 3)))
    }
}

/// Checks that the trainer binary starts (`heterotune-trainer --version`)
/// before a run depends on it. A trainer whose dynamic loader cannot find
/// libtorch exits 127 before `main`; the error says how to fix that.
pub fn check_starts(binary: &Path) -> Result<(), String> {
    let mut cmd = std::process::Command::new(binary);
    for var in CREDENTIAL_ENV {
        cmd.env_remove(var);
    }
    let out = cmd
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!(
                "cannot start the trainer {}: {e}; build it (cargo build --release -p heterotune-trainer) or pass --trainer",
                binary.display()
            )
        })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let hint = if stderr.contains("error while loading shared libraries") {
        "it cannot load libtorch: rebuild it after `source scripts/env.sh` (the build then records \
         the venv's torch/lib in the binary), or run `source scripts/env.sh` in this shell \
         (it sets LD_LIBRARY_PATH)"
    } else {
        "check that --trainer names a heterotune-trainer binary of this version"
    };
    Err(format!(
        "the trainer {} does not start ({}: {}); {hint}",
        binary.display(),
        out.status,
        tail(&stderr, 2)
    ))
}

/// Makes the process `cmd` starts receive SIGKILL when the thread that
/// started it ends (Linux `PR_SET_PDEATHSIG`): a runner or pod-side job
/// killed with SIGKILL leaves no trainer behind, training on and writing
/// to the store. The runtime's worker threads live as long as the runner.
pub fn die_with_parent(cmd: &mut tokio::process::Command) {
    #[cfg(target_os = "linux")]
    // SAFETY: the closure runs in the child between fork and exec and calls
    // only prctl(2), which is async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The store's credentials: a trainer reads and writes local files only (the
/// runner or `heterotune job` moves them to and from the store), so it
/// starts without them and nothing it prints or loads can reveal them.
const CREDENTIAL_ENV: [&str; 3] = [ACCESS_KEY_ENV, SECRET_KEY_ENV, "AWS_SESSION_TOKEN"];

impl TrainerCommand {
    fn command(&self, sub: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.binary);
        die_with_parent(&mut cmd);
        for var in CREDENTIAL_ENV {
            cmd.env_remove(var);
        }
        cmd.arg(sub).arg("--spec").arg(&self.spec);
        if let Some(staged) = &self.staged {
            cmd.env(heterotune_crds::uri::STAGED_ENV, staged);
        }
        if self.time_cpu_dtype {
            cmd.env(heterotune_crds::dtype::TIMING_ENV, "1");
        } else {
            cmd.env_remove(heterotune_crds::dtype::TIMING_ENV);
        }
        cmd
    }

    /// The arguments `train` and `eval` share: `client`'s model on `device`
    /// with the global artifact in `global` (and its private state), the
    /// prefix caches in `cache`, the output at `out`.
    #[allow(clippy::too_many_arguments)]
    fn client_command(
        &self,
        sub: &str,
        client: &str,
        device: &str,
        global: &Path,
        state_in: Option<&Path>,
        cache: &Path,
        out: &Path,
    ) -> tokio::process::Command {
        let mut cmd = self.command(sub);
        cmd.arg("--client")
            .arg(client)
            .arg("--device")
            .arg(device)
            .arg("--global")
            .arg(global)
            .arg("--cache-dir")
            .arg(cache)
            .arg("--out")
            .arg(out)
            .arg("--run")
            .arg(&self.run);
        if self.threads > 0 {
            cmd.arg("--threads").arg(self.threads.to_string());
        }
        if let Some(state_in) = state_in {
            cmd.arg("--state-in").arg(state_in);
        }
        cmd
    }

    /// The `train` command line of `client` in `round`.
    fn train_command(
        &self,
        client: &str,
        round: u32,
        device: &str,
        global: &Path,
        dirs: &ClientDirs,
    ) -> tokio::process::Command {
        let mut cmd = self.client_command(
            "train",
            client,
            device,
            global,
            dirs.state_in.as_deref(),
            &dirs.cache,
            &dirs.out,
        );
        cmd.arg("--round")
            .arg(round.to_string())
            .arg("--state-out")
            .arg(&dirs.state_out);
        cmd
    }

    /// Trains `client` for `round` and waits for it; returns its stdout.
    pub async fn train(
        &self,
        client: &str,
        round: u32,
        device: &str,
        global: &Path,
        dirs: &ClientDirs,
    ) -> Result<String, String> {
        let _ = std::fs::remove_dir_all(&dirs.out);
        if let Some(parent) = dirs.state_out.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        let cmd = self.train_command(client, round, device, global, dirs);
        run_to_end(
            cmd,
            &format!("training {client} in round {round}"),
            self.live_logs,
        )
        .await
    }

    /// Writes the round-0 global artifact into `out`.
    pub async fn init(&self, out: &Path) -> Result<(), String> {
        let mut cmd = self.command("init");
        cmd.arg("--out").arg(out).arg("--run").arg(&self.run);
        run_to_end(cmd, "initialising the global state", self.live_logs)
            .await
            .map(|_| ())
    }

    /// Aggregates `round` from the artifacts staged under `run_dir`.
    pub async fn aggregate(
        &self,
        run_dir: &Path,
        round: u32,
        previous: &Path,
        out: &Path,
    ) -> Result<(), String> {
        let mut cmd = self.command("aggregate");
        cmd.arg("--run-dir")
            .arg(run_dir)
            .arg("--run")
            .arg(&self.run)
            .arg("--round")
            .arg(round.to_string())
            .arg("--previous-global")
            .arg(previous)
            .arg("--out")
            .arg(out);
        run_to_end(cmd, &format!("aggregating round {round}"), self.live_logs)
            .await
            .map(|_| ())
    }

    /// Evaluates `client` on the global model in `global` and waits for it.
    pub async fn evaluate(
        &self,
        client: &str,
        device: &str,
        global: &Path,
        state_in: Option<&Path>,
        cache: &Path,
        out: &Path,
    ) -> Result<String, String> {
        let cmd = self.client_command("eval", client, device, global, state_in, cache, out);
        run_to_end(cmd, &format!("evaluating {client}"), self.live_logs).await
    }

    /// Starts training `client` for `round` in the background; its exit is
    /// sent on `tx`. Returns the handle that cancels it.
    pub fn spawn_train(
        &self,
        client: &str,
        round: u32,
        attempt: u32,
        global: &Path,
        dirs: &ClientDirs,
        tx: mpsc::UnboundedSender<ClientExit>,
    ) -> Result<oneshot::Sender<()>, String> {
        let _ = std::fs::remove_dir_all(&dirs.out);
        if let Some(parent) = dirs.state_out.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        let cmd = self.train_command(client, round, "cpu", global, dirs);
        let exit = ClientExit::pending(client, round, false, &dirs.out);
        self.spawn(cmd, exit, attempt, dirs.log.clone(), tx)
    }

    /// Starts `client`'s evaluation of the global model of `round` (in
    /// `global`) in the background, the result written to `out`; its exit
    /// is sent on `tx`. Returns the handle that cancels it.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn_eval(
        &self,
        client: &str,
        round: u32,
        attempt: u32,
        global: &Path,
        dirs: &ClientDirs,
        out: &Path,
        tx: mpsc::UnboundedSender<ClientExit>,
    ) -> Result<oneshot::Sender<()>, String> {
        let _ = std::fs::remove_file(out);
        let cmd = self.client_command(
            "eval",
            client,
            "cpu",
            global,
            dirs.state_in.as_deref(),
            &dirs.cache,
            out,
        );
        let exit = ClientExit::pending(client, round, true, out);
        let log = dirs
            .log
            .with_file_name(format!("evaluation-round-{round:04}.log"));
        self.spawn(cmd, exit, attempt, log, tx)
    }

    /// Runs `cmd` in the background; `exit` (filled in with the outcome)
    /// is sent on `tx` when it ends, its output kept in `log`.
    fn spawn(
        &self,
        mut cmd: tokio::process::Command,
        mut exit: ClientExit,
        attempt: u32,
        log: PathBuf,
        tx: mpsc::UnboundedSender<ClientExit>,
    ) -> Result<oneshot::Sender<()>, String> {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.binary.display()))?;
        let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
        let started = std::time::Instant::now();
        tokio::spawn(async move {
            tokio::select! {
                output = child.wait_with_output() => {
                    (exit.ok, exit.summary) = match output {
                        Ok(out) => {
                            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
                            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
                            let _ = std::fs::write(&log, format!("attempt {attempt}\n{stdout}\n{stderr}"));
                            if out.status.success() {
                                (true, stdout)
                            } else {
                                (false, format!("exit {}: {}", out.status, tail(&stderr, 3)))
                            }
                        }
                        Err(e) => (false, format!("trainer process error: {e}")),
                    };
                    exit.seconds = started.elapsed().as_secs_f64();
                    let _ = tx.send(exit);
                }
                _ = cancel_rx => {
                    // Dropping the child kills it (kill_on_drop); a cancelled
                    // trainer is not a failure and reports nothing.
                }
            }
        });
        Ok(cancel_tx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_of(pid: u32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit(')').next()?.trim_start().chars().next()
    }

    /// Trainers of `heterotune run` and `heterotune site` may time the CPU's
    /// dtype and keep it; a pod's may not (and does not inherit the switch).
    #[test]
    fn only_local_trainers_time_the_cpu_dtype() {
        let switch = std::ffi::OsStr::new(heterotune_crds::dtype::TIMING_ENV);
        for local in [true, false] {
            let t = TrainerCommand {
                binary: PathBuf::from("heterotune-trainer"),
                spec: PathBuf::from("spec.json"),
                threads: 1,
                run: "r".into(),
                staged: None,
                live_logs: !local,
                time_cpu_dtype: local,
            };
            let cmd = t.command("train");
            let set = cmd
                .as_std()
                .get_envs()
                .find(|(k, _)| *k == switch)
                .map(|(_, v)| v.map(|v| v.to_os_string()));
            let expected = if local {
                Some(Some("1".into()))
            } else {
                Some(None)
            };
            assert_eq!(set, expected, "local: {local}");
        }
    }

    /// Whatever a child prints, a credential in its log's tail is redacted
    /// before it reaches the error (the runner's console, report and a
    /// pod's termination message).
    #[tokio::test]
    async fn a_credential_a_child_prints_is_redacted_from_its_error() {
        let canary = "htcanary-secret-9c41d2e8";
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c").arg(format!(
            "echo 'AWS_SECRET_ACCESS_KEY={canary} HOME=/root' >&2; echo 'Error: boom' >&2; exit 1"
        ));
        let e = run_to_end(cmd, "aggregating round 1", false)
            .await
            .expect_err("exit 1");
        assert!(!e.contains(canary), "{e}");
        assert!(
            e.contains("AWS_SECRET_ACCESS_KEY=<redacted> HOME=/root") && e.contains("Error: boom"),
            "{e}"
        );
    }

    /// A trainer that cannot load libtorch is refused with the fix; one
    /// that starts passes.
    #[test]
    fn a_trainer_that_cannot_load_libtorch_is_named_with_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = dir.path().join("heterotune-trainer");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho 'heterotune-trainer: error while loading shared libraries: libtorch_cpu.so: cannot open shared object file' >&2\nexit 127\n",
        )
        .expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let e = check_starts(&fake).expect_err("exit 127 is refused");
        assert!(
            e.contains("libtorch_cpu.so") && e.contains("source scripts/env.sh"),
            "{e}"
        );
        let e = check_starts(&dir.path().join("missing")).expect_err("missing");
        assert!(
            e.contains("cargo build --release -p heterotune-trainer"),
            "{e}"
        );
        check_starts(Path::new("/bin/true")).expect("a binary that starts");
    }

    /// A child started with [`die_with_parent`] is killed when the thread
    /// that started it ends, as when a runner is killed.
    #[test]
    fn a_trainer_dies_with_its_parent() {
        let (tx, rx) = std::sync::mpsc::channel();
        let parent = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let mut cmd = tokio::process::Command::new("sleep");
                cmd.arg("30");
                die_with_parent(&mut cmd);
                let child = cmd.spawn().expect("spawn sleep");
                tx.send(child.id().expect("pid")).expect("send");
                // The runtime and this thread end without waiting.
                std::mem::forget(child);
            });
        });
        let pid = rx.recv().expect("pid");
        parent.join().expect("parent thread");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while matches!(state_of(pid), Some(s) if s != 'Z') {
            assert!(
                std::time::Instant::now() < deadline,
                "sleep {pid} outlived the thread that started it"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // Reap it (the test process is its parent); SAFETY: a plain syscall on our own child.
        unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), 0) };
    }
}
