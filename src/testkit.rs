//! Test support: throwaway SoftHSM2 tokens and swtpm instances.

// ---- swtpm ----

/// A throwaway `swtpm` (TPM 2.0 simulator) listening on 127.0.0.1, with its
/// state in a temporary directory. Killed and reaped on drop.
///
/// Used by the TPM integration tests and benchmarks:
/// `TpmConfig { tcti: swtpm.tcti(), .. }`. The swtpm TCTI opens a TCP
/// connection per command, so `tpm2_*` tools (`TPM2TOOLS_TCTI=<tcti()>`) can
/// run while a `TpmRoot` is open; there is no resource manager, so they see
/// (and can flush) its transient objects.
pub struct Swtpm {
    /// TPM command port; the control port is `port + 1`.
    pub port: u16,
    dir: tempfile::TempDir,
    child: std::process::Child,
}

/// How long `Swtpm::start`/`restart` wait for the command port to accept.
const SWTPM_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Swtpm {
    /// Starts a fresh simulator (new state directory, free port pair).
    pub fn start() -> std::io::Result<Swtpm> {
        let dir = tempfile::Builder::new()
            .prefix("keyseal-swtpm-")
            .tempdir()?;
        // Another process can take the ports between the probe and swtpm's
        // bind; retry with a new pair when swtpm does not come up.
        let mut last_err = std::io::Error::other("swtpm did not start");
        for _ in 0..5 {
            let port = swtpm_free_port_pair()?;
            let mut child = swtpm_spawn(dir.path(), port)?;
            match swtpm_wait_ready(&mut child, dir.path(), port) {
                Ok(()) => return Ok(Swtpm { port, dir, child }),
                Err(e) => {
                    swtpm_reap(&mut child);
                    last_err = e;
                }
            }
        }
        Err(last_err)
    }

    /// The TCTI string for this instance (`swtpm:host=127.0.0.1,port=N`).
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The state directory (`--tpmstate dir=`).
    pub fn state_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The simulator's process id (fault tests pause it with SIGSTOP).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the simulator (SIGKILL) and reaps it. Idempotent.
    pub fn kill(&mut self) {
        swtpm_reap(&mut self.child);
    }

    /// Kills the simulator and starts it again on the same ports with the
    /// same state directory: persistent state and seeds survive; transient
    /// objects, sessions and PCR values do not (as after a reboot).
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.kill();
        // The listening sockets close with the process; wait until both
        // ports can be bound again.
        let deadline = std::time::Instant::now() + SWTPM_READY_TIMEOUT;
        while !(swtpm_port_free(self.port) && swtpm_port_free(self.port.saturating_add(1))) {
            if std::time::Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "ports {} and {} did not become free after killing swtpm",
                    self.port,
                    self.port.saturating_add(1)
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        self.child = swtpm_spawn(self.dir.path(), self.port)?;
        swtpm_wait_ready(&mut self.child, self.dir.path(), self.port)
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.kill();
    }
}

impl std::fmt::Debug for Swtpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Swtpm")
            .field("port", &self.port)
            .field("state_dir", &self.dir.path())
            .field("pid", &self.child.id())
            .finish()
    }
}

fn swtpm_reap(child: &mut std::process::Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

fn swtpm_port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A port N such that N and N+1 are both free on 127.0.0.1 right now.
///
/// Candidates come from 10000..30000, below Linux's ephemeral range
/// (32768..60999): tpm2-tss's swtpm TCTI opens a TCP connection per TPM
/// command, so a busy test run leaves tens of thousands of client sockets in
/// TIME_WAIT on ephemeral ports, and a pair picked there collides often.
fn swtpm_free_port_pair() -> std::io::Result<u16> {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    for _ in 0..200 {
        let port: u16 = rng.gen_range(10_000..30_000);
        if swtpm_port_free(port) && swtpm_port_free(port + 1) {
            return Ok(port);
        }
    }
    Err(std::io::Error::other(
        "no free pair of consecutive TCP ports on 127.0.0.1 in 10000..30000",
    ))
}

fn swtpm_spawn(dir: &std::path::Path, port: u16) -> std::io::Result<std::process::Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("swtpm.stderr"))?;
    std::process::Command::new("swtpm")
        .arg("socket")
        .arg("--tpm2")
        .arg("--tpmstate")
        .arg(format!("dir={}", dir.display()))
        .arg("--server")
        .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
        .arg("--ctrl")
        .arg(format!(
            "type=tcp,port={},bindaddr=127.0.0.1",
            port.saturating_add(1)
        ))
        .arg("--flags")
        .arg("not-need-init,startup-clear")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                std::io::Error::new(
                    e.kind(),
                    "swtpm not found in PATH; install it (Debian: `apt-get install swtpm swtpm-tools`)",
                )
            } else {
                e
            }
        })
}

/// Waits until swtpm accepts on its command port, or fails (it exited, or
/// the timeout passed) with its stderr in the message.
fn swtpm_wait_ready(
    child: &mut std::process::Child,
    dir: &std::path::Path,
    port: u16,
) -> std::io::Result<()> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = std::time::Instant::now() + SWTPM_READY_TIMEOUT;
    let stderr = || std::fs::read_to_string(dir.join("swtpm.stderr")).unwrap_or_default();
    loop {
        if let Some(status) = child.try_wait()? {
            return Err(std::io::Error::other(format!(
                "swtpm exited during startup ({status}) on port {port}: {}",
                stderr().trim()
            )));
        }
        // swtpm serves one client at a time; this probe closes at once.
        if std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(200))
            .is_ok()
        {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "swtpm did not accept connections on 127.0.0.1:{port} within {SWTPM_READY_TIMEOUT:?}: {}",
                    stderr().trim()
                ),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

// ---- end swtpm ----
