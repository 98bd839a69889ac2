//! Shared support for meshd's integration tests: the two-cluster lab (scripts/lab.sh) driven from
//! Rust, commands inside its namespaces, and sockets opened inside them.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Lab tests share the machine's two cores; one lab at a time per test binary.
static LAB_LOCK: Mutex<()> = Mutex::new(());

pub const M1_POD: &str = "10.244.1.10";
pub const M2_POD: &str = "10.245.1.10";
pub const M1_UNDERLAY: &str = "192.0.2.1";
pub const M2_UNDERLAY: &str = "192.0.2.2";

/// True when the test may build labs; otherwise the test is skipped ([`skip`]).
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root || skip(
        test,
        "needs root (network namespaces, TUN devices); run the suite as root",
    )
}

/// Skips `test` for `why`: says so on the terminal (past the test harness's output capture, so
/// a passing run still shows it), or fails the test when `MESHD_NO_SKIP` is set, as
/// scripts/test.sh sets it when run as root, so that a green suite always exercised the lab.
/// Returns false, for `if !... { return; }`.
pub fn skip(test: &str, why: &str) -> bool {
    if std::env::var_os("MESHD_NO_SKIP").is_some_and(|v| !v.is_empty()) {
        panic!("{test} would be skipped ({why}), and MESHD_NO_SKIP is set: nothing may be skipped in this run");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
    false
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_meshd"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn meshctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshctl"))
}

pub fn text(out: &Output) -> String {
    format!(
        "status: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A running lab; torn down on drop (also when the test panics).
pub struct Lab {
    pub prefix: String,
    pub state: PathBuf,
    _guard: MutexGuard<'static, ()>,
}

/// `scripts/lab.sh`, in the fast one-node-per-cluster topology unless `extra` names `--nodes`.
fn lab_script(action: &str, prefix: &str, m1: &str, m2: &str, extra: &[&str]) -> Output {
    let nodes: &[&str] = if extra.contains(&"--nodes") {
        &[]
    } else {
        &["--nodes", "1"]
    };
    Command::new(repo_root().join("scripts/lab.sh"))
        .args([action, "--prefix", prefix, "--m1", m1, "--m2", m2])
        .args(nodes)
        .args(extra)
        .env("MESHD_BIN_DIR", bin_dir())
        .output()
        .expect("run scripts/lab.sh")
}

impl Lab {
    /// Brings up the lab with the given implementation in each gateway and waits for pod↔pod ping.
    pub fn up(prefix: &str, m1: &str, m2: &str) -> Lab {
        Self::up_with(prefix, m1, m2, &[])
    }

    /// As [`Lab::up`], with more `scripts/lab.sh` options (e.g. `--nat`).
    pub fn up_with(prefix: &str, m1: &str, m2: &str, extra: &[&str]) -> Lab {
        let guard = LAB_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let out = lab_script("up", prefix, m1, m2, extra);
        let lab = Lab {
            prefix: prefix.to_string(),
            state: PathBuf::from(format!("/run/meshd-lab/{prefix}")),
            _guard: guard,
        };
        assert!(out.status.success(), "lab up failed:\n{}", text(&out));
        lab
    }

    /// Runs `scripts/lab.sh up` again over this lab without taking it down first, as after a
    /// crash of the script; returns its output.
    pub fn up_again(&self) -> Output {
        lab_script("up", &self.prefix, "meshd", "meshd", &[])
    }

    pub fn ns(&self, name: &str) -> String {
        format!("{}{}", self.prefix, name)
    }

    pub fn iface(&self, i: u8) -> String {
        format!("{}m{i}wg", self.prefix)
    }

    /// Runs a command inside one of the lab's namespaces.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(ns)])
            .args(args)
            .output()
            .expect("run ip netns exec")
    }

    pub fn exec_ok(&self, ns: &str, args: &[&str]) -> String {
        let out = self.exec(ns, args);
        assert!(
            out.status.success(),
            "{args:?} in {ns} failed:\n{}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    pub fn ping(&self, from: &str, to: &str) -> bool {
        self.exec(from, &["ping", "-c", "1", "-W", "1", to])
            .status
            .success()
    }

    /// Retries ping until it answers or `limit` passes; returns how long it took.
    pub fn ping_within(&self, from: &str, to: &str, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.ping(from, to) {
                return Some(start.elapsed());
            }
        }
        None
    }

    /// Runs iperf3 from `client` to the server it starts in `server` at `server_ip`; returns the
    /// bytes the receiver got.
    pub fn iperf3(&self, client: &str, server: &str, server_ip: &str, args: &[&str]) -> u64 {
        let pidfile = self.state.join(format!("iperf3-{server}.pid"));
        self.exec_ok(
            server,
            &["iperf3", "-s", "-1", "-D", "-I", pidfile.to_str().unwrap()],
        );
        std::thread::sleep(Duration::from_millis(300));
        let mut cmd = vec!["iperf3", "-c", server_ip, "-J"];
        cmd.extend_from_slice(args);
        let out = self.exec(client, &cmd);
        let json = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "iperf3 failed:\n{}", text(&out));
        received_bytes(&json).unwrap_or_else(|| panic!("no sum_received in iperf3 output:\n{json}"))
    }

    /// Opens a TCP connection from m1pod to a listener in m2pod on `port` and returns the MSS
    /// that `ss` shows for it in `side` (`m1pod`, the client, or `m2pod`, the server), with ss's
    /// output.
    pub fn tcp_mss(&self, port: u16, side: &str) -> (u32, String) {
        let server = format!("{M2_POD}:{port}");
        let listener = in_netns(&self.ns("m2pod"), {
            let server = server.clone();
            move || std::net::TcpListener::bind(server).unwrap()
        });
        let client = in_netns(&self.ns("m1pod"), {
            let server = server.clone();
            move || std::net::TcpStream::connect(server).unwrap()
        });
        let (_accepted, _) = listener.accept().unwrap();
        let direction = if side == "m1pod" { "dst" } else { "src" };
        let ss = self.exec_ok(side, &["ss", "-tin", direction, &server]);
        let mss = ss
            .split_whitespace()
            .find_map(|w| w.strip_prefix("mss:"))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no mss in ss output:\n{ss}"));
        drop(client);
        (mss, ss)
    }

    /// `wg show <iface> dump` in gateway `i`: one line for the device, one per peer.
    pub fn wg_dump(&self, i: u8) -> Vec<Vec<String>> {
        let out = self.exec_ok(&format!("m{i}gw"), &["wg", "show", &self.iface(i), "dump"]);
        out.lines()
            .map(|l| l.split('\t').map(str::to_string).collect())
            .collect()
    }

    pub fn pid(&self, i: u8) -> i32 {
        std::fs::read_to_string(self.state.join(format!("m{i}.pid")))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    pub fn log(&self, i: u8) -> String {
        std::fs::read_to_string(self.state.join(format!("m{i}.log"))).unwrap_or_default()
    }

    /// Kills gateway `i`'s meshd and waits until it is gone, rewrites its config with `edit`, and
    /// starts a new meshd on it; returns once the new one serves its UAPI socket. The caller
    /// owns (and must reap) the new process.
    pub fn restart_meshd(&self, i: u8, edit: impl FnOnce(String) -> String) -> std::process::Child {
        self.restart_meshd_env(i, &[], edit)
    }

    /// As [`Lab::restart_meshd`], with `env` added to the new meshd's environment.
    pub fn restart_meshd_env(
        &self,
        i: u8,
        env: &[(&str, &str)],
        edit: impl FnOnce(String) -> String,
    ) -> std::process::Child {
        self.kill_meshd(i);
        self.start_meshd_env(i, env, edit)
    }

    /// Kills gateway `i`'s meshd (SIGKILL: no goodbye to its peer) and waits until it is gone.
    pub fn kill_meshd(&self, i: u8) {
        let old = self.pid(i);
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(old, libc::SIGKILL) };
        let alive = || {
            std::fs::read_to_string(format!("/proc/{old}/comm")).is_ok_and(|c| c.trim() == "meshd")
        };
        let start = Instant::now();
        while alive() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(), "meshd {old} did not die");
    }

    /// Starts meshd in gateway `i` (after [`Lab::kill_meshd`]) with its config rewritten by
    /// `edit`; returns once it serves its UAPI socket. The caller owns (and must reap) it.
    pub fn start_meshd(&self, i: u8, edit: impl FnOnce(String) -> String) -> std::process::Child {
        self.start_meshd_env(i, &[], edit)
    }

    /// As [`Lab::start_meshd`], with `env` added to meshd's environment.
    pub fn start_meshd_env(
        &self,
        i: u8,
        env: &[(&str, &str)],
        edit: impl FnOnce(String) -> String,
    ) -> std::process::Child {
        let socket = PathBuf::from(format!("/var/run/wireguard/{}.sock", self.iface(i)));
        let _ = std::fs::remove_file(&socket);
        let config = self.state.join(format!("m{i}.toml"));
        std::fs::write(&config, edit(std::fs::read_to_string(&config).unwrap())).unwrap();
        let log = std::fs::File::create(self.state.join(format!("m{i}.log"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(&format!("m{i}gw"))])
            .arg(env!("CARGO_BIN_EXE_meshd"))
            .args(["--config", config.to_str().unwrap()])
            .envs(env.iter().copied())
            .stderr(log)
            .spawn()
            .unwrap();
        std::fs::write(self.state.join(format!("m{i}.pid")), child.id().to_string()).unwrap();
        let start = Instant::now();
        while !socket.exists() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            socket.exists(),
            "restarted meshd is not serving\n{}",
            self.log(i)
        );
        child
    }

    /// Starts meshd on `node` (one of the lab's namespaces) with `config`, as the lab starts a
    /// route agent: its admin socket at `<state>/<node>.admin.sock`, its log at
    /// `<state>/<node>.log`, its PID in `<state>/<node>.pid`; with `kubeconfig`, the Kubernetes
    /// API it names. The caller owns (and must reap) it.
    pub fn spawn_node_meshd(
        &self,
        node: &str,
        config: &Path,
        kubeconfig: Option<&Path>,
    ) -> std::process::Child {
        let log = std::fs::File::create(self.state.join(format!("{node}.log"))).unwrap();
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.ns(node)])
            .arg(env!("CARGO_BIN_EXE_meshd"))
            .arg("--config")
            .arg(config)
            .arg("--admin-socket")
            .arg(self.state.join(format!("{node}.admin.sock")))
            .stdout(std::process::Stdio::null())
            .stderr(log);
        if let Some(kubeconfig) = kubeconfig {
            command
                .env("KUBECONFIG", kubeconfig)
                .env_remove("KUBERNETES_SERVICE_HOST");
        }
        let child = command.spawn().unwrap();
        std::fs::write(
            self.state.join(format!("{node}.pid")),
            child.id().to_string(),
        )
        .unwrap();
        child
    }

    /// Opens a UDP socket bound inside namespace `ns` (the socket stays in it after we return).
    pub fn udp_socket_in(&self, ns: &str) -> UdpSocket {
        in_netns(&self.ns(ns), || UdpSocket::bind("0.0.0.0:0").unwrap())
    }

    /// Fetches `path` over HTTP from `addr` inside namespace `ns`.
    pub fn http_get(&self, ns: &str, addr: &str, path: &str) -> String {
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        let path = path.to_string();
        in_netns(&self.ns(ns), move || {
            use std::io::{Read, Write};
            let mut s =
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
            write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).unwrap();
            body
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let out = lab_script("down", &self.prefix, "meshd", "meshd", &[]);
        if !out.status.success() {
            eprintln!("lab down failed:\n{}", text(&out));
        }
    }
}

/// Runs `f` on a thread that has entered network namespace `ns`.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: a valid namespace fd; setns affects only this thread, which ends after `f`.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("namespace thread panicked")
}

/// The receiver's byte count from `iperf3 -J` output (TCP or UDP).
pub fn received_bytes(json: &str) -> Option<u64> {
    let key = "\"sum_received\"";
    let at = json.find(key).or_else(|| json.find("\"sum\""))?;
    let rest = &json[at..];
    let b = rest.find("\"bytes\":")? + "\"bytes\":".len();
    let digits: String = rest[b..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// Reads one sample from Prometheus text: `name{label="value"}`.
pub fn metric(body: &str, name_and_labels: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Polls `f` every 100 ms until it holds or `limit` passes; how long it took.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// The PID the lab recorded for `name` (m1, m1n2, ...).
pub fn pid(lab: &Lab, name: &str) -> i32 {
    std::fs::read_to_string(lab.state.join(format!("{name}.pid")))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Sends `signal` to `pid` and waits until the process is gone.
pub fn stop(pid: i32, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, signal) };
    let gone = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
    });
    assert!(
        gone.is_some(),
        "meshd {pid} did not exit on signal {signal}"
    );
}

/// `meshctl peers --output json` on `node`; `Err` with meshctl's output when it gave no JSON.
pub fn try_peers_json(lab: &Lab, node: &str) -> Result<serde_json::Value, String> {
    let socket = lab.state.join(format!("{node}.admin.sock"));
    let out = meshctl()
        .args([
            "peers",
            "--output",
            "json",
            "--socket",
            socket.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", text(&out)))
}

pub fn peers_json(lab: &Lab, node: &str) -> serde_json::Value {
    try_peers_json(lab, node).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `scripts/lab.sh demo` (which brings the lab up and takes it down) with meshd in both
/// gateways and `extra` options, holding the lab lock; returns its output.
pub fn lab_demo(prefix: &str, extra: &[&str]) -> Output {
    let _guard = LAB_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    lab_script("demo", prefix, "meshd", "meshd", extra)
}
