//! A private PostgreSQL cluster for tests: `initdb` into a temporary
//! directory, `postgres` on a free loopback port, stopped and removed when
//! dropped. Run as root, the cluster belongs to `nobody` (PostgreSQL
//! refuses to run as root).
//!
//! The server binaries are looked for in `MUSTER_PG_BINDIR`, then in the
//! newest `/usr/lib/postgresql/*/bin` (Debian's layout), then on `PATH`.
//! Without them [`PgCluster::start`] says so loudly and returns `None`, so
//! a test can skip; with `MUSTER_REQUIRE_POSTGRES` set (as CI sets it) their
//! absence is an error instead.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a cluster may take to accept connections.
const READY_WITHIN: Duration = Duration::from_secs(60);
/// The user and database tests connect as.
pub const USER: &str = "muster";

/// A running private cluster.
#[derive(Debug)]
pub struct PgCluster {
    root: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    postmaster: Option<Child>,
    /// The unprivileged user and group the cluster runs as, when the
    /// tests run as root.
    owner: Option<(u32, u32)>,
}

/// The directory holding `initdb` and `postgres`, if any.
pub fn binaries() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("MUSTER_PG_BINDIR") {
        return Some(PathBuf::from(dir));
    }
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    debian.sort();
    if let Some((_, bin)) = debian.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|dir| dir.join("initdb").is_file() && dir.join("postgres").is_file())
}

fn nobody() -> Result<(u32, u32), String> {
    let name = c"nobody";
    // SAFETY: getpwnam returns a pointer to static storage or null; it is
    // read at once, before any other call could reuse that storage.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        return Err("running as root, and there is no user `nobody` to run PostgreSQL as".into());
    }
    // SAFETY: checked non-null above.
    let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
    Ok((uid, gid))
}

fn chown_all(path: &Path, (uid, gid): (u32, u32)) -> Result<(), String> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::chown(c.as_ptr(), uid, gid) } != 0 {
        return Err(format!("chown {}: {}", path.display(), std::io::Error::last_os_error()));
    }
    if path.is_dir() {
        for entry in std::fs::read_dir(path).map_err(|e| e.to_string())? {
            chown_all(&entry.map_err(|e| e.to_string())?.path(), (uid, gid))?;
        }
    }
    Ok(())
}

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("finding a free port: {e}"))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

impl PgCluster {
    /// Starts a new cluster, or returns `None` (after saying why on stderr)
    /// when the PostgreSQL server binaries are absent and not required.
    pub fn start() -> Result<Option<Self>, String> {
        let Some(bin) = binaries() else {
            let message = "PostgreSQL server binaries (initdb, postgres) not found: install Debian's `postgresql` \
                           package or set MUSTER_PG_BINDIR";
            if std::env::var_os("MUSTER_REQUIRE_POSTGRES").is_some() {
                return Err(format!("{message} (MUSTER_REQUIRE_POSTGRES is set)"));
            }
            eprintln!("\n*** SKIPPED a PostgreSQL test: {message} ***\n");
            return Ok(None);
        };
        let root = tempfile::Builder::new().prefix("muster-pg").tempdir().map_err(|e| e.to_string())?;
        // SAFETY: geteuid has no preconditions.
        let owner = if unsafe { libc::geteuid() } == 0 { Some(nobody()?) } else { None };
        std::fs::create_dir(root.path().join("sock")).map_err(|e| e.to_string())?;
        if let Some(owner) = owner {
            chown_all(root.path(), owner)?;
        }
        let mut cluster = Self { root, bin, port: 0, postmaster: None, owner };
        let data = cluster.root.path().join("data");
        let init = cluster
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", USER, "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"])
            .output()
            .map_err(|e| format!("running initdb: {e}"))?;
        if !init.status.success() {
            return Err(format!("initdb failed: {}", String::from_utf8_lossy(&init.stderr)));
        }
        cluster.launch()?;
        Ok(Some(cluster))
    }

    /// A command running `program` from the binaries, as the cluster's owner.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut command = match self.owner {
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.args([format!("--reuid={uid}"), format!("--regid={gid}"), "--clear-groups".into()]).arg(path);
                c
            }
            None => Command::new(path),
        };
        command.stdin(Stdio::null());
        command
    }

    /// Starts the postmaster on a free port and waits until it accepts
    /// connections.
    fn launch(&mut self) -> Result<(), String> {
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port()?;
            self.spawn_postmaster(port)?;
            match self.wait_ready() {
                Ok(()) => return Ok(()),
                Err(e) => {
                    last = e;
                    self.kill();
                }
            }
        }
        Err(last)
    }

    fn spawn_postmaster(&mut self, port: u16) -> Result<(), String> {
        let log = std::fs::File::create(self.root.path().join("postgres.log")).map_err(|e| e.to_string())?;
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.root.path().join("data"))
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(self.root.path().join("sock"))
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting postgres: {e}"))?;
        self.postmaster = Some(child);
        self.port = port;
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(child) = self.postmaster.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("postgres exited ({status}): {}", self.log()));
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("postgres did not accept connections within {READY_WITHIN:?}: {}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the postmaster wrote to its log.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(self.root.path().join("postgres.log")) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// The URL of the cluster's `postgres` database.
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// The URL of database `db` (create it with [`PgCluster::create_database`]).
    pub fn url_of(&self, db: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates an empty database, so tests can share one cluster.
    pub fn create_database(&self, db: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER, db])
            .output()
            .map_err(|e| format!("running createdb: {e}"))?;
        if !out.status.success() {
            return Err(format!("createdb {db} failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(self.url_of(db))
    }

    /// The postmaster's process id.
    pub fn pid(&self) -> Option<u32> {
        self.postmaster.as_ref().map(Child::id)
    }

    /// Stops the postmaster ("fast": open sessions are ended) and starts
    /// it again on the same port.
    pub fn restart(&mut self) -> Result<(), String> {
        self.signal(libc::SIGINT);
        if let Some(mut child) = self.postmaster.take() {
            let _ = child.wait();
        }
        self.spawn_postmaster(self.port)?;
        self.wait_ready()
    }

    fn signal(&self, signal: libc::c_int) {
        if let Some(pid) = self.pid().and_then(|p| libc::pid_t::try_from(p).ok()) {
            // SAFETY: signalling our own child, which has not been reaped.
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// Immediate shutdown: what dropping does.
    fn kill(&mut self) {
        self.signal(libc::SIGQUIT);
        if let Some(mut child) = self.postmaster.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.kill();
    }
}
