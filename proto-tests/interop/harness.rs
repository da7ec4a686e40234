//! Reusable helpers for the interop suite: starting nbdferry and peer servers,
//! running peer tools with deadlines, making sparse images, hashing and
//! comparing files, reading data/hole layouts and a tiny raw NBD client for
//! hostile-input tests.
//!
//! Rules: every process started here is killed by pid in a Drop guard
//! (SIGTERM, then SIGKILL after a deadline) and reaped; nothing waits by
//! sleeping a fixed time; a missing peer makes the test fail loudly.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub use tempfile::TempDir;

/// Deadline for a server to become ready or to exit after a signal.
pub const READY_DEADLINE: Duration = Duration::from_secs(20);
/// Deadline for one peer tool invocation (debug-build server, 2 cores).
pub const CMD_DEADLINE: Duration = Duration::from_secs(180);
/// Timeout on every read/write of the raw test client.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

pub const SIGINT: i32 = 2;
pub const SIGKILL: i32 = 9;
pub const SIGTERM: i32 = 15;

/// Send a signal to a pid. Returns false if the process does not exist.
pub fn send_signal(pid: u32, sig: i32) -> bool {
    let (Some(pid), Some(sig)) = (
        rustix::process::Pid::from_raw(pid as i32),
        rustix::process::Signal::from_named_raw(sig),
    ) else {
        return false;
    };
    rustix::process::kill_process(pid, sig).is_ok()
}

// ---------------------------------------------------------------------------
// Peers and commands
// ---------------------------------------------------------------------------

/// The Debian package that provides a peer binary.
pub fn package_of(bin: &str) -> &'static str {
    match bin {
        "qemu-img" | "qemu-io" | "qemu-nbd" => "qemu-utils",
        "nbdinfo" | "nbdcopy" => "libnbd-bin",
        "nbdsh" => "libnbd-bin and python3-libnbd",
        "nbdkit" => "nbdkit",
        "nbd-server" => "nbd-server",
        "nbd-client" => "nbd-client",
        "fio" => "fio",
        "prometheus" => "prometheus",
        "certtool" => "gnutls-bin",
        "ip" | "tc" => "iproute2",
        "losetup" => "mount (util-linux)",
        "s3s-fs" => {
            "s3s-fs: not Debian's; `cargo install s3s-fs --features binary` as .ci/run does"
        }
        _ => "the package providing it",
    }
}

fn search_path() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for extra in ["/usr/bin", "/usr/sbin", "/sbin", "/bin", "/usr/local/bin"] {
        let extra = PathBuf::from(extra);
        if !dirs.contains(&extra) {
            dirs.push(extra);
        }
    }
    dirs
}

/// Absolute path of a peer binary; fails the test loudly when it is missing.
pub fn require_peer(bin: &str) -> PathBuf {
    static CACHE: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    if let Some(p) = cache.get(bin) {
        return p.clone();
    }
    let found = search_path()
        .into_iter()
        .map(|d| d.join(bin))
        .find(|p| p.is_file());
    let Some(path) = found else {
        panic!(
            "required peer binary `{bin}` not found on PATH: install the Debian package {} \
             (apt-get install {})",
            package_of(bin),
            package_of(bin).replace(" and ", " ")
        );
    };
    if bin == "nbdsh" {
        let ok = Command::new("/usr/bin/python3")
            .args(["-c", "import nbd"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "/usr/bin/python3 can not `import nbd`: install the Debian package python3-libnbd"
        );
    }
    cache.insert(bin.to_string(), path.clone());
    path
}

/// A `Command` for a peer tool, with `/usr/bin` first on PATH (nbdsh must
/// find the Debian python3 that has the `nbd` module).
pub fn peer(bin: &str) -> Command {
    let path = require_peer(bin);
    let mut c = Command::new(path);
    let old = std::env::var("PATH").unwrap_or_default();
    c.env("PATH", format!("/usr/bin:/usr/sbin:{old}"));
    c.env("LC_ALL", "C");
    c.stdin(Stdio::null());
    c
}

/// A `Command` for the nbdferry binary under test.
pub fn nbdferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nbdferry"));
    c.stdin(Stdio::null());
    c
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            s.push_str(&format!("'{a}'"));
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Run a command to completion with a deadline; returns its output whatever
/// the exit status. On timeout the process is killed and the test fails.
pub fn run_output_deadline(cmd: &mut Command, deadline: Duration) -> Output {
    run_output_fed(cmd, deadline, None)
}

/// Writes to a command's stdin while it runs.
type Feed<'a> = Box<dyn FnOnce(&mut std::process::ChildStdin) + 'a>;

/// Runs a command as [`run_output_deadline`] does; with `feed`, its stdin
/// is a pipe that `feed` gets once the command runs (and that is closed
/// when `feed` returns), so a test can release a script at the moment it
/// chooses.
fn run_output_fed(cmd: &mut Command, deadline: Duration, feed: Option<Feed<'_>>) -> Output {
    let desc = describe(cmd);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if feed.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn `{desc}`: {e}"));
    let pid = child.id();
    let stdin = child.stdin.take();
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let (tx, rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        let st = child.wait();
        let _ = tx.send(());
        st
    });
    if let (Some(feed), Some(mut stdin)) = (feed, stdin) {
        // A failing feed (its own wait timed out) must not leave the
        // command running.
        let fed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| feed(&mut stdin)));
        if let Err(why) = fed {
            send_signal(pid, SIGKILL);
            let _ = waiter.join();
            std::panic::resume_unwind(why);
        }
    }
    if rx.recv_timeout(deadline).is_err() {
        send_signal(pid, SIGKILL);
        let _ = waiter.join();
        let stderr = t_err.join().unwrap_or_default();
        panic!(
            "`{desc}` did not finish within {deadline:?}; stderr:\n{}",
            String::from_utf8_lossy(&stderr)
        );
    }
    let status = waiter.join().expect("waiter").expect("wait");
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

pub fn run_output(cmd: &mut Command) -> Output {
    run_output_deadline(cmd, CMD_DEADLINE)
}

/// Run a command; fail the test (with its stderr) unless it exits 0.
/// Returns stdout.
pub fn run(cmd: &mut Command) -> String {
    run_fed(cmd, None)
}

fn run_fed(cmd: &mut Command, feed: Option<Feed<'_>>) -> String {
    let desc = describe(cmd);
    let out = run_output_fed(cmd, CMD_DEADLINE, feed);
    if !out.status.success() {
        panic!(
            "`{desc}` failed with {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a command that must fail (non-zero exit); returns (stdout, stderr).
pub fn run_fail(cmd: &mut Command) -> (String, String) {
    let desc = describe(cmd);
    let out = run_output(cmd);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "`{desc}` unexpectedly succeeded\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    (stdout, stderr)
}

// ---------------------------------------------------------------------------
// Process guards
// ---------------------------------------------------------------------------

/// Wait for a child with a deadline (bounded polling of try_wait).
pub fn wait_child(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + deadline;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() >= end {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// SIGTERM, wait up to `deadline`, then SIGKILL and reap.
pub fn terminate_child(child: &mut Child, deadline: Duration) -> ExitStatus {
    if let Ok(Some(st)) = child.try_wait() {
        return st;
    }
    send_signal(child.id(), SIGTERM);
    if let Some(st) = wait_child(child, deadline) {
        return st;
    }
    send_signal(child.id(), SIGKILL);
    child.wait().expect("reap child")
}

fn pid_alive(pid: u32) -> bool {
    // A zombie (not reaped because it is not our child) counts as dead.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .unwrap_or("");
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}

/// Kill a process that is not our child (daemonized) by pid, with a deadline.
pub fn terminate_pid(pid: u32, deadline: Duration) {
    if !pid_alive(pid) {
        return;
    }
    send_signal(pid, SIGTERM);
    let end = Instant::now() + deadline;
    while pid_alive(pid) && Instant::now() < end {
        thread::sleep(Duration::from_millis(10));
    }
    if pid_alive(pid) {
        send_signal(pid, SIGKILL);
        let end = Instant::now() + deadline;
        while pid_alive(pid) && Instant::now() < end {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Poll `cond` until true or the deadline passes.
pub fn wait_until(deadline: Duration, what: &str, cond: impl FnMut() -> bool) {
    assert!(
        wait_for(deadline, cond),
        "timed out after {deadline:?} waiting for {what}"
    );
}

/// Poll `cond` until true (true) or the deadline passes (false), for a
/// caller that says more than "timed out" when it does.
pub fn wait_for(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while !cond() {
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
    true
}

/// True when some socket in LISTEN state is bound to 127.0.0.1:port or
/// 0.0.0.0:port (read from /proc/net/tcp, no connection is made).
pub fn port_listening(port: u16) -> bool {
    let Ok(s) = fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let want_lo = format!("0100007F:{port:04X}");
    let want_any = format!("00000000:{port:04X}");
    s.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && (f[1] == want_lo || f[1] == want_any) && f[3] == "0A"
    })
}

/// True when 127.0.0.1:port (or 0.0.0.0:port) is listening on a socket that
/// process `pid` holds: guards against another process having taken a port
/// that `free_port` returned.
pub fn port_listening_by(port: u16, pid: u32) -> bool {
    let Ok(s) = fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let want_lo = format!("0100007F:{port:04X}");
    let want_any = format!("00000000:{port:04X}");
    let inodes: Vec<String> = s
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 9 && (f[1] == want_lo || f[1] == want_any) && f[3] == "0A")
                .then(|| format!("socket:[{}]", f[9]))
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|e| {
        fs::read_link(e.path())
            .map(|l| inodes.iter().any(|i| l.as_os_str() == i.as_str()))
            .unwrap_or(false)
    })
}

/// A port that was free a moment ago (the caller retries on a collision).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

// ---------------------------------------------------------------------------
// nbdferry server
// ---------------------------------------------------------------------------

/// The text of a daemon's status line (`listening on ...`): the line
/// itself, or with `NBDFERRY_LOG_FORMAT=json` the message of a status
/// object.
pub fn status_text(line: &str) -> std::borrow::Cow<'_, str> {
    let json = line
        .starts_with('{')
        .then(|| serde_json::from_str::<serde_json::Value>(line).ok())
        .flatten();
    match json {
        Some(v) if v["target"] == "nbdferry::status" => {
            v["message"].as_str().unwrap_or_default().to_string().into()
        }
        _ => line.into(),
    }
}

/// One raw HTTP/1.1 request to an admin API Unix socket: (status, body).
pub fn admin_http(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut c = UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {sock:?}: {e}"));
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in: {answer}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A running `nbdferry serve`. Killed (SIGTERM, then SIGKILL) on drop.
pub struct Server {
    child: Option<Child>,
    pub pid: u32,
    /// TCP address from the readiness line, if any.
    pub addr: Option<SocketAddr>,
    /// Unix socket path from the readiness line, if any.
    pub socket: Option<PathBuf>,
    /// Export name used by `uri()` / `unix_uri()`.
    pub name: String,
    pub log: Arc<Mutex<Vec<String>>>,
    /// A private state directory (admin socket, snapshot state) unless the
    /// test chose one, so that no test touches the system default.
    _state: Option<tempfile::TempDir>,
}

impl Server {
    /// `nbdferry serve ARGS`, waits for the `listening on ` line.
    pub fn start<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Server {
        Server::start_env(args, &[])
    }

    /// [`start`](Self::start) with extra environment variables.
    pub fn start_env<S: AsRef<std::ffi::OsStr>>(args: &[S], env: &[(&str, &str)]) -> Server {
        Server::start_command(nbdferry(), args, env)
    }

    /// [`start`](Self::start) inside network namespace `ns` (the process
    /// keeps its pid: `ip netns exec` execs it).
    pub fn start_in<S: AsRef<std::ffi::OsStr>>(ns: &str, args: &[S]) -> Server {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(env!("CARGO_BIN_EXE_nbdferry"))
            .stdin(Stdio::null());
        Server::start_command(cmd, args, &[])
    }

    fn start_command<S: AsRef<std::ffi::OsStr>>(
        mut cmd: Command,
        args: &[S],
        env: &[(&str, &str)],
    ) -> Server {
        cmd.arg("serve").args(args).envs(env.iter().copied());
        let state = if args.iter().any(|a| a.as_ref() == "--state-dir") {
            None
        } else {
            let dir = tempfile::tempdir().expect("state dir");
            cmd.arg("--state-dir").arg(dir.path());
            Some(dir)
        };
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let desc = describe(&cmd);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn `{desc}`: {e}"));
        let pid = child.id();
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<Option<String>>();
        {
            let log = log.clone();
            thread::spawn(move || {
                let mut sent = false;
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    log.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(line.clone());
                    let status = status_text(&line);
                    if !sent && status.starts_with("listening on ") {
                        sent = true;
                        let _ = tx.send(Some(status.to_string()));
                    }
                }
                let _ = tx.send(None);
            });
        }
        let mut server = Server {
            child: Some(child),
            pid,
            addr: None,
            socket: None,
            name: String::new(),
            log,
            _state: state,
        };
        match rx.recv_timeout(READY_DEADLINE) {
            Ok(Some(line)) => {
                let rest = line.trim_start_matches("listening on ").trim();
                for part in rest.split(", ") {
                    let part = part.trim();
                    if let Some(p) = part.strip_prefix("unix:") {
                        server.socket = Some(PathBuf::from(p));
                    } else {
                        let a: SocketAddr = part.parse().unwrap_or_else(|e| {
                            panic!("bad address `{part}` in readiness line `{line}`: {e}")
                        });
                        assert_ne!(a.port(), 0, "readiness line shows port 0: `{line}`");
                        if server.addr.is_none() {
                            server.addr = Some(a);
                        }
                    }
                }
                if let Some(s) = &server.socket {
                    assert!(
                        s.exists(),
                        "readiness line names {s:?} but it does not exist"
                    );
                }
                server
            }
            Ok(None) => {
                let st = server
                    .child
                    .as_mut()
                    .and_then(|c| wait_child(c, READY_DEADLINE));
                panic!(
                    "`{desc}` exited ({st:?}) before printing `listening on`; stderr:\n{}",
                    server.log_text()
                );
            }
            Err(_) => panic!(
                "`{desc}` did not print `listening on ...` within {READY_DEADLINE:?}; stderr:\n{}",
                server.log_text()
            ),
        }
    }

    /// `serve --listen 127.0.0.1:0 --state-dir STATE --config CFG`.
    pub fn serve_config(state: &Path, cfg: &Path) -> Server {
        let utf8 = |p: &Path| p.to_str().expect("utf-8 path").to_string();
        Server::start(&[
            "--listen".to_string(),
            "127.0.0.1:0".to_string(),
            "--state-dir".to_string(),
            utf8(state),
            "--config".to_string(),
            utf8(cfg),
        ])
    }

    /// Serve `file` on 127.0.0.1:0 and on a Unix socket in `dir`.
    pub fn serve(dir: &Path, file: &Path, extra: &[&str]) -> Server {
        Server::serve_env(dir, file, extra, &[])
    }

    /// [`serve`](Self::serve) with extra environment variables.
    pub fn serve_env(dir: &Path, file: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let sock = dir.join(format!("nbdferry-{}.sock", unique()));
        let mut args: Vec<std::ffi::OsString> = vec![
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--socket".into(),
            sock.clone().into(),
        ];
        args.extend(extra.iter().map(Into::into));
        args.push(file.into());
        let s = Server::start_env(&args, env);
        assert!(s.addr.is_some(), "no TCP address in readiness line");
        assert_eq!(
            s.socket.as_deref(),
            Some(sock.as_path()),
            "readiness line does not show the unix socket"
        );
        s
    }

    /// A daemon serving `file` as the live disk `disk`, with its state
    /// (admin socket, snapshots, checkpoints) in `state`.
    pub fn live(dir: &Path, file: &Path, state: &Path) -> Server {
        let st = state.to_str().expect("utf-8 path");
        Server::serve(dir, file, &["--name", "disk", "--state-dir", st]).with_name("disk")
    }

    pub fn with_name(mut self, name: &str) -> Server {
        self.name = name.to_string();
        self
    }

    pub fn port(&self) -> u16 {
        self.addr.expect("server has no TCP listener").port()
    }

    pub fn uri(&self) -> String {
        self.uri_for(&self.name)
    }

    pub fn uri_for(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port(), name)
    }

    pub fn unix_uri(&self) -> String {
        self.unix_uri_for(&self.name)
    }

    pub fn unix_uri_for(&self, name: &str) -> String {
        let s = self.socket.as_ref().expect("server has no unix socket");
        format!("nbd+unix:///{}?socket={}", name, s.display())
    }

    pub fn log_text(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn signal(&self, sig: i32) {
        send_signal(self.pid, sig);
    }

    /// Send `sig` and wait for the exit status (fails the test on timeout).
    pub fn stop_with(self, sig: i32) -> ExitStatus {
        send_signal(self.pid, sig);
        self.reap(&format!(" after signal {sig}"))
    }

    /// Wait for the server to exit by itself (after a signal sent earlier).
    pub fn wait_exit(self) -> ExitStatus {
        self.reap("")
    }

    /// The exit status, within READY_DEADLINE; else SIGKILL and fail.
    fn reap(mut self, after: &str) -> ExitStatus {
        let mut child = self.child.take().expect("child");
        match wait_child(&mut child, READY_DEADLINE) {
            Some(st) => st,
            None => {
                send_signal(child.id(), SIGKILL);
                let _ = child.wait();
                panic!(
                    "nbdferry did not exit within {READY_DEADLINE:?}{after}; stderr:\n{}",
                    self.log_text()
                );
            }
        }
    }

    /// SIGTERM and assert a clean exit (status 0).
    pub fn stop(self) {
        let log = self.log.clone();
        let st = self.stop_with(SIGTERM);
        assert!(
            st.success(),
            "nbdferry exited with {st} after SIGTERM; stderr:\n{}",
            log.lock().unwrap_or_else(|e| e.into_inner()).join("\n")
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate_child(&mut c, Duration::from_secs(5));
            if thread::panicking() {
                eprintln!(
                    "---- nbdferry stderr (pid {}) ----\n{}",
                    self.pid,
                    self.log_text()
                );
            }
        }
    }
}

pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

// ---------------------------------------------------------------------------
// Peer servers
// ---------------------------------------------------------------------------

/// A peer server process that we spawned (qemu-nbd, nbdkit). Killed on drop.
pub struct PeerServer {
    child: Child,
    pub port: Option<u16>,
    pub socket: Option<PathBuf>,
    what: String,
}

impl PeerServer {
    /// Spawn `make(port)` on a free port, wait until the port listens;
    /// retries with another port if the process dies first (port race).
    pub fn spawn_tcp(what: &str, mut make: impl FnMut(u16) -> Command) -> PeerServer {
        let mut last_err = String::new();
        for _ in 0..3 {
            let port = free_port();
            let mut cmd = make(port);
            cmd.stdout(Stdio::null()).stderr(Stdio::piped());
            let desc = describe(&cmd);
            let mut child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("cannot spawn `{desc}`: {e}"));
            let end = Instant::now() + READY_DEADLINE;
            loop {
                if port_listening_by(port, child.id()) {
                    return PeerServer {
                        child,
                        port: Some(port),
                        socket: None,
                        what: what.to_string(),
                    };
                }
                if let Ok(Some(st)) = child.try_wait() {
                    let mut e = String::new();
                    if let Some(mut s) = child.stderr.take() {
                        let _ = s.read_to_string(&mut e);
                    }
                    last_err = format!("`{desc}` exited with {st}: {e}");
                    break;
                }
                if Instant::now() >= end {
                    terminate_child(&mut child, Duration::from_secs(5));
                    panic!("`{desc}` did not listen on port {port} within {READY_DEADLINE:?}");
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        panic!("{what} failed to start: {last_err}");
    }

    /// Spawn a server that listens on the Unix socket `sock`.
    pub fn spawn_unix(what: &str, mut cmd: Command, sock: &Path) -> PeerServer {
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let desc = describe(&cmd);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn `{desc}`: {e}"));
        let end = Instant::now() + READY_DEADLINE;
        while !sock.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                let mut e = String::new();
                if let Some(mut s) = child.stderr.take() {
                    let _ = s.read_to_string(&mut e);
                }
                panic!("`{desc}` exited with {st}: {e}");
            }
            if Instant::now() >= end {
                terminate_child(&mut child, Duration::from_secs(5));
                panic!("`{desc}` did not create {sock:?} within {READY_DEADLINE:?}");
            }
            thread::sleep(Duration::from_millis(10));
        }
        PeerServer {
            child,
            port: None,
            socket: Some(sock.to_path_buf()),
            what: what.to_string(),
        }
    }

    pub fn uri(&self, name: &str) -> String {
        match (&self.port, &self.socket) {
            (Some(p), _) => format!("nbd://127.0.0.1:{p}/{name}"),
            (None, Some(s)) => format!("nbd+unix:///{name}?socket={}", s.display()),
            _ => unreachable!(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        let st = terminate_child(&mut self.child, Duration::from_secs(5));
        if thread::panicking() {
            let mut e = String::new();
            if let Some(mut s) = self.child.stderr.take() {
                let _ = s.read_to_string(&mut e);
            }
            eprintln!("---- {} exited {st}; stderr ----\n{e}", self.what);
        }
    }
}

/// qemu-nbd serving `image` (raw) on a free TCP port.
pub fn qemu_nbd(image: &Path, name: &str, read_only: bool) -> PeerServer {
    PeerServer::spawn_tcp("qemu-nbd", |port| {
        let mut c = peer("qemu-nbd");
        c.args(["-f", "raw", "-t", "-e", "8", "-x", name, "-b", "127.0.0.1"]);
        c.arg("-p").arg(port.to_string());
        if read_only {
            c.arg("-r");
        } else {
            c.arg("--discard=unmap");
        }
        c.arg(image);
        c
    })
}

/// nbdkit PLUGIN ARGS on a free TCP port (foreground, exits with us).
pub fn nbdkit_tcp(plugin_args: &[String]) -> PeerServer {
    PeerServer::spawn_tcp("nbdkit", |port| {
        let mut c = peer("nbdkit");
        c.args(["-f", "--exit-with-parent", "-i", "127.0.0.1", "-p"]);
        c.arg(port.to_string());
        c.args(plugin_args);
        c
    })
}

/// The reference nbd-server, daemonized with a pid file; killed by that pid.
pub struct NbdServerRef {
    pub pid: u32,
    pub port: u16,
}

impl NbdServerRef {
    /// `exports`: (name, path, read_only)
    pub fn start(dir: &Path, exports: &[(&str, &Path, bool)]) -> NbdServerRef {
        let mut last = String::new();
        for attempt in 0..3 {
            let port = free_port();
            let conf = dir.join(format!("nbd-server-{attempt}.conf"));
            let pidfile = dir.join(format!("nbd-server-{attempt}.pid"));
            let mut text = format!(
                "[generic]\n    allowlist = true\n    listenaddr = 127.0.0.1\n    port = {port}\n"
            );
            for (name, path, ro) in exports {
                text.push_str(&format!("[{name}]\n    exportname = {}\n", path.display()));
                if *ro {
                    text.push_str("    readonly = true\n");
                }
                text.push_str("    flush = true\n    fua = true\n    trim = true\n");
            }
            fs::write(&conf, text).expect("write nbd-server config");
            let mut c = peer("nbd-server");
            c.arg("-C").arg(&conf).arg("-p").arg(&pidfile);
            let out = run_output(&mut c);
            if !out.status.success() {
                last = String::from_utf8_lossy(&out.stderr).into_owned();
                continue;
            }
            let end = Instant::now() + READY_DEADLINE;
            let mut pid = None;
            while Instant::now() < end {
                if let Ok(s) = fs::read_to_string(&pidfile)
                    && let Ok(p) = s.trim().parse::<u32>()
                {
                    pid = Some(p);
                    if port_listening_by(port, p) {
                        return NbdServerRef { pid: p, port };
                    }
                    if !pid_alive(p) {
                        break;
                    }
                }
                thread::sleep(Duration::from_millis(10));
            }
            if let Some(p) = pid {
                terminate_pid(p, Duration::from_secs(5));
            }
            last = format!("nbd-server did not listen on {port} (pid file {pidfile:?})");
        }
        panic!("nbd-server failed to start: {last}");
    }

    pub fn uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port, name)
    }
}

impl Drop for NbdServerRef {
    fn drop(&mut self) {
        terminate_pid(self.pid, Duration::from_secs(5));
    }
}

// ---------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------

/// splitmix64: small deterministic PRNG for image contents and layouts.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        // Never leave a 4 KiB block that is all zero in a data run.
        for blk in buf.chunks_mut(4096) {
            blk[0] |= 1;
        }
    }
}

/// Create a sparse image of `size` bytes with pseudo-random data runs at
/// scattered 4 KiB-aligned offsets (about 25% data) plus runs at the very
/// start and end; everything else is a hole. Returns the data runs written.
pub fn make_sparse_image(path: &Path, size: u64, seed: u64) -> Vec<(u64, u64)> {
    assert!(size.is_multiple_of(64 * KIB) && size >= MIB);
    let f = File::create(path).unwrap_or_else(|e| panic!("create {path:?}: {e}"));
    f.set_len(size).expect("set_len");
    let mut rng = Rng::new(seed);
    let mut runs = vec![(0, 64 * KIB), (size - 12 * KIB, 12 * KIB)];
    let target = size / 4;
    let mut total = 76 * KIB;
    while total < target {
        let len = (1 + rng.below(64)) * 4 * KIB; // 4 KiB .. 256 KiB
        let off = rng.below((size - len) / (4 * KIB)) * 4 * KIB;
        runs.push((off, len));
        total += len;
    }
    let mut buf = vec![0u8; 256 * KIB as usize];
    for &(off, len) in &runs {
        let b = &mut buf[..len as usize];
        rng.fill(b);
        f.write_all_at(b, off).expect("write run");
    }
    f.sync_all().ok();
    runs
}

/// A fully allocated image filled with `byte` (a dirty upload target).
pub fn make_filled_image(path: &Path, size: u64, byte: u8) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {path:?}: {e}"));
    let buf = vec![byte; MIB as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(MIB);
        f.write_all(&buf[..n as usize]).expect("write");
        left -= n;
    }
}

/// An empty (all-hole) image.
pub fn make_empty_image(path: &Path, size: u64) {
    let f = File::create(path).unwrap_or_else(|e| panic!("create {path:?}: {e}"));
    f.set_len(size).expect("set_len");
}

pub fn copy_file(from: &Path, to: &Path) {
    // Keep holes: copy only data extents.
    let src = File::open(from).expect("open src");
    let size = src.metadata().expect("meta").len();
    let dst = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(to)
        .expect("create dst");
    dst.set_len(size).expect("set_len");
    let mut buf = vec![0u8; MIB as usize];
    for (off, len, data) in data_map(from) {
        if !data {
            continue;
        }
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(MIB) as usize;
            src.read_exact_at(&mut buf[..n], pos).expect("read");
            dst.write_all_at(&buf[..n], pos).expect("write");
            pos += n as u64;
        }
    }
}

/// xxh3-64 of the whole file content.
pub fn hash_file(path: &Path) -> u64 {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {path:?}: {e}"));
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.digest()
}

pub fn hash_bytes(b: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(b)
}

/// Assert two files have identical size and content; on mismatch report the
/// first differing offset.
pub fn assert_same_content(a: &Path, b: &Path) {
    let fa = File::open(a).unwrap_or_else(|e| panic!("open {a:?}: {e}"));
    let fb = File::open(b).unwrap_or_else(|e| panic!("open {b:?}: {e}"));
    let (la, lb) = (fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    assert_eq!(
        la, lb,
        "size differs: {a:?} is {la} bytes, {b:?} is {lb} bytes"
    );
    let mut ba = vec![0u8; MIB as usize];
    let mut bb = vec![0u8; MIB as usize];
    let mut off = 0u64;
    while off < la {
        let n = (la - off).min(MIB) as usize;
        fa.read_exact_at(&mut ba[..n], off).unwrap();
        fb.read_exact_at(&mut bb[..n], off).unwrap();
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
            panic!(
                "{a:?} and {b:?} differ first at offset {} ({:#04x} vs {:#04x}); hashes {:016x} vs {:016x}",
                off + i as u64,
                ba[i],
                bb[i],
                hash_file(a),
                hash_file(b)
            );
        }
        off += n as u64;
    }
    assert_eq!(hash_file(a), hash_file(b));
}

/// Assert the file content equals `model`.
pub fn assert_file_eq_bytes(path: &Path, model: &[u8]) {
    let got = fs::read(path).unwrap_or_else(|e| panic!("read {path:?}: {e}"));
    assert_eq!(got.len(), model.len(), "{path:?} has the wrong size");
    if got != model {
        let i = (0..got.len()).find(|&i| got[i] != model[i]).unwrap();
        panic!(
            "{path:?} differs from the model first at offset {i} ({:#04x} vs expected {:#04x})",
            got[i], model[i]
        );
    }
}

/// Bytes actually allocated on disk for a file.
pub fn allocated_bytes(path: &Path) -> u64 {
    fs::metadata(path).expect("metadata").blocks() * 512
}

/// Data/hole layout of a local file via SEEK_DATA/SEEK_HOLE:
/// merged, contiguous extents `(offset, length, is_data)` covering the file.
pub fn data_map(path: &Path) -> Vec<(u64, u64, bool)> {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {path:?}: {e}"));
    let size = f.metadata().unwrap().len();
    let seek = |to: rustix::fs::SeekFrom| rustix::fs::seek(&f, to).map_or(size, |o| o.min(size));
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let data_start = seek(rustix::fs::SeekFrom::Data(pos));
        if data_start > pos {
            out.push((pos, data_start - pos, false));
        }
        if data_start >= size {
            break;
        }
        let hole_start = seek(rustix::fs::SeekFrom::Hole(data_start));
        out.push((data_start, hole_start - data_start, true));
        pos = hole_start;
    }
    merge_extents(out)
}

/// Merge adjacent extents with the same kind.
pub fn merge_extents(v: Vec<(u64, u64, bool)>) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for (o, l, d) in v {
        if l == 0 {
            continue;
        }
        if let Some(last) = out.last_mut()
            && last.2 == d
            && last.0 + last.1 == o
        {
            last.1 += l;
            continue;
        }
        out.push((o, l, d));
    }
    out
}

pub fn fmt_extents(v: &[(u64, u64, bool)]) -> String {
    v.iter()
        .map(|(o, l, d)| format!("{o:>10} {l:>10} {}", if *d { "data" } else { "hole" }))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `nbdinfo --map URI` parsed into merged `(offset, length, is_data)`
/// (is_data = the HOLE bit is clear), checking contiguity.
pub fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, bool)> {
    let out = run(peer("nbdinfo").arg("--map").arg(uri));
    let mut v = Vec::new();
    let mut expect = 0u64;
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(f.len() >= 3, "unparsable nbdinfo --map line `{line}`");
        let off: u64 = f[0].parse().expect("offset");
        let len: u64 = f[1].parse().expect("length");
        let ty: u32 = f[2].parse().expect("type");
        assert_eq!(off, expect, "nbdinfo --map is not contiguous at `{line}`");
        expect = off + len;
        v.push((off, len, ty & 1 == 0));
    }
    merge_extents(v)
}

/// `qemu-img map --output=json` of a URI, merged `(offset, length, is_data)`.
pub fn qemu_img_map(uri: &str) -> Vec<(u64, u64, bool)> {
    let out = run(peer("qemu-img")
        .args(["map", "--output=json", "-f", "raw"])
        .arg(uri));
    let mut v = Vec::new();
    for line in out.lines().filter(|l| l.contains("\"start\"")) {
        let start = json_u64(line, "start").expect("start");
        let len = json_u64(line, "length").expect("length");
        let data = json_bool(line, "data").expect("data");
        v.push((start, len, data));
    }
    merge_extents(v)
}

/// What follows `"key":` in a line of JSON (no serde in this crate).
fn json_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\":");
    let i = text.find(&pat)? + pat.len();
    Some(text[i..].trim_start())
}

/// The leading characters of `rest` that `keep` accepts, parsed.
fn json_token<T: std::str::FromStr>(rest: &str, keep: impl Fn(char) -> bool) -> Option<T> {
    let end = rest.find(|c: char| !keep(c)).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Extract `"key": 123` from a line of JSON.
pub fn json_u64(text: &str, key: &str) -> Option<u64> {
    json_token(json_after(text, key)?, |c| c.is_ascii_digit())
}

pub fn json_f64(text: &str, key: &str) -> Option<f64> {
    json_token(json_after(text, key)?, |c| {
        c.is_ascii_digit() || "+-.eE".contains(c)
    })
}

pub fn json_bool(text: &str, key: &str) -> Option<bool> {
    let rest = json_after(text, key)?;
    if rest.starts_with("true") {
        Some(true)
    } else if rest.starts_with("false") {
        Some(false)
    } else {
        None
    }
}

pub fn json_str(text: &str, key: &str) -> Option<String> {
    let rest = json_after(text, key)?.strip_prefix('"')?;
    let end = rest.find('"')?;
    Some(rest[..end].to_string())
}

/// Read a range of a local file.
/// `qemu-io -f raw -c CMD... URI`, which must report no error.
pub fn qemu_io(uri: &str, cmds: &[String]) {
    let mut c = peer("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = run(c.arg(uri));
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io reported: {out}"
    );
}

pub fn read_range(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).expect("open");
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).expect("read_exact_at");
    b
}

/// Run an nbdsh script (Python, /usr/bin/python3 via nbdsh) with env vars;
/// the script is written to `dir`. Returns stdout; fails on non-zero exit.
pub fn nbdsh_script(dir: &Path, script: &str, env: &[(&str, String)]) -> String {
    run(&mut nbdsh_command(dir, script, env))
}

/// Like [`nbdsh_script`], for a script that reads a line from stdin where
/// it must wait: `gate` returns when the script may go on.
pub fn nbdsh_script_gated(
    dir: &Path,
    script: &str,
    env: &[(&str, String)],
    gate: impl FnOnce(),
) -> String {
    run_fed(
        &mut nbdsh_command(dir, script, env),
        Some(Box::new(|stdin| {
            gate();
            let _ = stdin.write_all(b"go\n");
        })),
    )
}

pub fn nbdsh_command(dir: &Path, script: &str, env: &[(&str, String)]) -> Command {
    let path = dir.join(format!("script-{}.py", unique()));
    fs::write(&path, script).expect("write script");
    let mut c = peer("nbdsh");
    c.arg("-n").arg("-c").arg(format!(
        "exec(open({:?}).read())",
        path.display().to_string()
    ));
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

// ---------------------------------------------------------------------------
// Raw NBD client (for hostile-input tests)
// ---------------------------------------------------------------------------

pub const NBDMAGIC: u64 = 0x4E42_444D_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const REP_MAGIC: u64 = 0x0003_E889_0455_65A9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ESHUTDOWN: u32 = 108;

pub trait Stream: Read + Write + Send {
    fn shutdown_write(&self);
    fn set_read_timeout_to(&self, d: Duration);
}
impl Stream for TcpStream {
    fn shutdown_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
    fn set_read_timeout_to(&self, d: Duration) {
        self.set_read_timeout(Some(d)).expect("set_read_timeout");
    }
}
impl Stream for UnixStream {
    fn shutdown_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
    fn set_read_timeout_to(&self, d: Duration) {
        self.set_read_timeout(Some(d)).expect("set_read_timeout");
    }
}

/// What a read on a possibly-closed connection returned.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    Data(Vec<u8>),
    /// EOF or connection reset: the server closed this connection.
    Closed,
}

pub struct RawConn {
    pub s: Box<dyn Stream>,
    /// A clone of the TCP stream (for writing from another thread).
    pub tcp: Option<TcpStream>,
    pub size: u64,
    pub tflags: u16,
}

/// The peer hung up (a reset counts: a server closing with unread input
/// sends one).
fn closed_by_peer(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// A read timeout expired.
fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl RawConn {
    pub fn tcp(addr: SocketAddr) -> RawConn {
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_nodelay(true).unwrap();
        RawConn {
            tcp: Some(s.try_clone().expect("clone")),
            s: Box::new(s),
            size: 0,
            tflags: 0,
        }
    }

    pub fn unix(path: &Path) -> RawConn {
        let s = UnixStream::connect(path).expect("connect unix");
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        RawConn {
            tcp: None,
            s: Box::new(s),
            size: 0,
            tflags: 0,
        }
    }

    /// Change the read timeout (e.g. to demand a prompt close).
    pub fn set_timeout(&mut self, d: Duration) {
        self.s.set_read_timeout_to(d);
    }

    /// Read exactly n bytes, or report that the server closed the connection.
    /// A timeout fails the test (the server must answer or close).
    pub fn read_n(&mut self, n: usize) -> ReadOutcome {
        let mut buf = vec![0u8; n];
        let mut got = 0;
        while got < n {
            match self.s.read(&mut buf[got..]) {
                Ok(0) => return ReadOutcome::Closed,
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if closed_by_peer(&e) => return ReadOutcome::Closed,
                Err(e) if timed_out(&e) => {
                    panic!("server neither answered nor closed in time (got {got}/{n} bytes)")
                }
                Err(e) => panic!("read error: {e}"),
            }
        }
        ReadOutcome::Data(buf)
    }

    pub fn must_read(&mut self, n: usize, what: &str) -> Vec<u8> {
        match self.read_n(n) {
            ReadOutcome::Data(b) => b,
            ReadOutcome::Closed => panic!("server closed the connection while we expected {what}"),
        }
    }

    /// Read until EOF (discarding bytes); fails on timeout.
    pub fn expect_closed(&mut self, what: &str) {
        let mut buf = [0u8; 4096];
        let mut total = 0usize;
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    total += n;
                    assert!(
                        total < 64 * 1024 * 1024,
                        "{what}: server keeps sending data"
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if closed_by_peer(&e) => return,
                Err(e) if timed_out(&e) => {
                    panic!("{what}: server did not close the connection in time")
                }
                Err(e) => panic!("{what}: read error {e}"),
            }
        }
    }

    /// Write; returns false if the server already closed the connection.
    pub fn send(&mut self, b: &[u8]) -> bool {
        match self.s.write_all(b) {
            Ok(()) => true,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                ) =>
            {
                false
            }
            Err(e) => panic!("write error: {e}"),
        }
    }

    /// Read and check the 18-byte newstyle greeting; returns handshake flags.
    pub fn greeting(&mut self) -> u16 {
        let g = self.must_read(18, "the greeting");
        assert_eq!(be64(&g[0..8]), NBDMAGIC, "bad NBDMAGIC in greeting");
        assert_eq!(be64(&g[8..16]), IHAVEOPT, "server is not newstyle");
        let flags = u16::from_be_bytes([g[16], g[17]]);
        assert!(flags & 1 == 1, "server does not set FIXED_NEWSTYLE");
        flags
    }

    /// Greeting + client flags (FIXED_NEWSTYLE | NO_ZEROES).
    pub fn start_options(&mut self) {
        let f = self.greeting();
        let cf: u32 = 1 | if f & 2 != 0 { 2 } else { 0 };
        assert!(self.send(&cf.to_be_bytes()), "server closed after greeting");
    }

    pub fn send_option(&mut self, code: u32, data: &[u8]) -> bool {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b)
    }

    /// One option reply: (option echoed, reply type, data), or None if closed.
    pub fn read_option_reply(&mut self) -> Option<(u32, u32, Vec<u8>)> {
        let ReadOutcome::Data(h) = self.read_n(20) else {
            return None;
        };
        assert_eq!(be64(&h[0..8]), REP_MAGIC, "bad option reply magic");
        let opt = be32(&h[8..12]);
        let ty = be32(&h[12..16]);
        let len = be32(&h[16..20]) as usize;
        assert!(len < 64 * 1024 * 1024, "option reply too long: {len}");
        let data = if len > 0 {
            match self.read_n(len) {
                ReadOutcome::Data(d) => d,
                ReadOutcome::Closed => return None,
            }
        } else {
            Vec::new()
        };
        Some((opt, ty, data))
    }

    /// OPT_GO for `name`; asserts success and enters transmission.
    pub fn go(&mut self, name: &str) {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        assert!(self.send_option(OPT_GO, &d), "server closed during GO");
        loop {
            let (opt, ty, data) = self
                .read_option_reply()
                .expect("server closed the connection during GO");
            assert_eq!(opt, OPT_GO, "reply does not echo OPT_GO");
            match ty {
                REP_INFO => {
                    if be16(&data[0..2]) == 0 {
                        assert_eq!(data.len(), 12, "NBD_INFO_EXPORT must be 12 bytes");
                        self.size = be64(&data[2..10]);
                        self.tflags = be16(&data[10..12]);
                    }
                }
                REP_ACK => {
                    assert!(data.is_empty(), "ACK with payload");
                    assert!(self.tflags & 1 == 1, "GO succeeded without NBD_INFO_EXPORT");
                    return;
                }
                t => panic!(
                    "GO for {name:?} failed with reply type {t:#x}: {}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
    }

    /// Full handshake (fixed newstyle, no structured replies) for `name`.
    pub fn handshake(&mut self, name: &str) {
        self.start_options();
        self.go(name);
    }

    pub fn send_request(&mut self, flags: u16, ty: u16, cookie: u64, off: u64, len: u32) -> bool {
        self.send(&request_header(flags, ty, cookie, off, len))
    }

    /// A simple reply header: Some((error, cookie)) or None if closed.
    pub fn read_simple_reply(&mut self) -> Option<(u32, u64)> {
        let ReadOutcome::Data(h) = self.read_n(16) else {
            return None;
        };
        assert_eq!(
            be32(&h[0..4]),
            SIMPLE_REPLY_MAGIC,
            "bad simple reply magic: {h:02x?}"
        );
        Some((be32(&h[4..8]), be64(&h[8..16])))
    }

    /// READ with a simple reply; asserts success and returns the data.
    pub fn read_at(&mut self, off: u64, len: u32) -> Vec<u8> {
        assert!(
            self.send_request(0, CMD_READ, 0xAB, off, len),
            "server closed"
        );
        let (err, cookie) = self
            .read_simple_reply()
            .expect("server closed before READ reply");
        assert_eq!(cookie, 0xAB, "cookie not echoed");
        assert_eq!(err, 0, "READ {off}+{len} failed with error {err}");
        self.must_read(len as usize, "READ data")
    }

    /// WRITE with a simple reply; returns the error value (0 = success).
    pub fn write_at(&mut self, off: u64, data: &[u8]) -> u32 {
        let mut b = Vec::with_capacity(28 + data.len());
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&CMD_WRITE.to_be_bytes());
        b.extend_from_slice(&0xCDu64.to_be_bytes());
        b.extend_from_slice(&off.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        assert!(self.send(&b), "server closed during WRITE");
        let (err, cookie) = self
            .read_simple_reply()
            .expect("server closed before WRITE reply");
        assert_eq!(cookie, 0xCD, "cookie not echoed");
        err
    }

    /// Soft disconnect.
    pub fn disconnect(mut self) {
        let _ = self.send_request(0, CMD_DISC, 0, 0, 0);
        self.s.shutdown_write();
        self.expect_closed("after NBD_CMD_DISC");
    }
}

/// A compact (28-byte) request header.
pub fn request_header(flags: u16, ty: u16, cookie: u64, off: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&ty.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&off.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// A fresh temp dir for one test.
pub fn tmpdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("nbdferry-interop-")
        .tempdir()
        .expect("tempdir")
}

/// Standard fixture: 64 MiB sparse image `disk.raw` in a fresh temp dir.
pub const IMG_SIZE: u64 = 64 * MIB;

pub fn fixture(seed: u64) -> (TempDir, PathBuf) {
    let dir = tmpdir();
    let img = dir.path().join("disk.raw");
    make_sparse_image(&img, IMG_SIZE, seed);
    (dir, img)
}

/// In-memory model of an export's content, for write/verify tests.
pub struct Model(pub Vec<u8>);

impl Model {
    pub fn from_file(path: &Path) -> Model {
        Model(fs::read(path).unwrap_or_else(|e| panic!("read {path:?}: {e}")))
    }
    pub fn fill(&mut self, off: u64, len: u64, byte: u8) {
        self.0[off as usize..(off + len) as usize].fill(byte);
    }
    pub fn zero(&mut self, off: u64, len: u64) {
        self.fill(off, len, 0);
    }
    pub fn write(&mut self, off: u64, data: &[u8]) {
        self.0[off as usize..off as usize + data.len()].copy_from_slice(data);
    }
    pub fn assert_file(&self, path: &Path) {
        assert_file_eq_bytes(path, &self.0);
    }
}

/// Assert that [off, off+len) of a local file is entirely a hole.
pub fn assert_hole(path: &Path, off: u64, len: u64) {
    let map = data_map(path);
    for &(o, l, d) in &map {
        if d && o < off + len && off < o + l {
            panic!(
                "expected a hole at {off}+{len} in {path:?}, but {o}+{l} is allocated data; map:\n{}",
                fmt_extents(&map)
            );
        }
    }
}

/// Assert a server-reported map equals the local file's data/hole layout.
pub fn assert_same_map(what: &str, got: &[(u64, u64, bool)], file: &Path) {
    let want = data_map(file);
    if got != want.as_slice() {
        panic!(
            "{what}: reported data/hole map differs from the backing file {file:?}\n--- reported ---\n{}\n--- SEEK_DATA/SEEK_HOLE ---\n{}",
            fmt_extents(got),
            fmt_extents(&want)
        );
    }
}
