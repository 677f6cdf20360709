//! One real etcd member on 127.0.0.1 for the tests that need a registry server (Debian
//! `etcd-server`): free ports, a temporary data directory, stop/restart/pause.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::client;

/// One etcd member on 127.0.0.1.
pub struct Etcd {
    pub client_port: u16,
    peer_port: u16,
    metrics_port: u16,
    dir: tempfile::TempDir,
    data: PathBuf,
    child: Option<Child>,
}

/// Three distinct free ports. The listeners are held until all three are chosen: dropped
/// one by one, the kernel could hand the same port out twice (seen: etcd's peer and client
/// URLs on one port, "address already in use").
fn free_ports() -> [u16; 3] {
    let ls: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let port = |i: usize| ls[i].local_addr().unwrap().port();
    [port(0), port(1), port(2)]
}

impl Etcd {
    pub async fn start() -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let [client_port, peer_port, metrics_port] = free_ports();
        let mut etcd = Etcd {
            client_port,
            peer_port,
            metrics_port,
            dir,
            data,
            child: None,
        };
        etcd.spawn().await;
        etcd
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub async fn spawn(&mut self) {
        std::fs::create_dir_all(&self.data).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&self.data, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        let c = format!("http://127.0.0.1:{}", self.client_port);
        let p = format!("http://127.0.0.1:{}", self.peer_port);
        let m = format!("http://127.0.0.1:{}", self.metrics_port);
        let log = self.dir.path().join("etcd.log");
        let child = Command::new("etcd")
            .args(["--name", "n1", "--data-dir"])
            .arg(&self.data)
            .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
            .args([
                "--listen-peer-urls",
                &p,
                "--initial-advertise-peer-urls",
                &p,
            ])
            .args([
                "--initial-cluster",
                &format!("n1={p}"),
                "--initial-cluster-state",
                "new",
            ])
            .args([
                "--listen-metrics-urls",
                &m,
                "--logger",
                "zap",
                "--log-outputs",
            ])
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "the `etcd` binary is not installed: these tests need a real etcd \
                 (Debian: `apt-get install -y etcd-server`)"
            ),
            Err(e) => panic!("cannot start etcd: {e}"),
        };
        self.child = Some(child);
        self.wait_healthy().await;
    }

    /// Polls `/health` until etcd reports `"health":"true"`.
    pub async fn wait_healthy(&mut self) {
        let client = client();
        let addr = format!("127.0.0.1:{}", self.client_port);
        for _ in 0..400 {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let log =
                    std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
                panic!("etcd exited with {status}:\n{log}");
            }
            let req = http::Request::get(format!("http://{addr}/health"))
                .body(http_body_util::Empty::new())
                .unwrap();
            if let Ok(Ok(res)) =
                tokio::time::timeout(Duration::from_secs(1), client.request(req)).await
            {
                use http_body_util::BodyExt;
                if let Ok(body) = res.into_body().collect().await {
                    if String::from_utf8_lossy(&body.to_bytes()).contains("\"health\":\"true\"") {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("etcd did not become healthy");
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts on the same ports with the same data.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    /// SIGSTOP: etcd keeps its connections open and answers nothing.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT: etcd resumes, finds the leases expired and revokes them.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    }

    /// Restarts on the same ports with an empty data directory: every lease is gone.
    pub async fn restart_empty(&mut self) {
        self.stop();
        std::fs::remove_dir_all(&self.data).unwrap();
        self.spawn().await;
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}
