//! The namespaces of a test: a switch with a bridge, one namespace per host, and the `socat` bridges to RabbitMQ and to the API.

use super::*;

/// The namespaces of one test, and the `socat` bridges it started.
pub(super) struct Net {
    pub(super) prefix: String,
    pub(super) switch: String,
    /// (namespace, address), in the order made.
    pub(super) hosts: Vec<(String, String)>,
    /// Unix sockets of the bridges (owned by the test).
    pub(super) sockets: tempfile::TempDir,
    /// Host-side `socat` for RabbitMQ.
    pub(super) amqp_sock: PathBuf,
    pub(super) helpers: Vec<Child>,
}

impl Net {
    /// A switch and one namespace per host name, each on the bridge, loopback up, and
    /// RabbitMQ reachable on its 127.0.0.1:5672.
    pub(super) fn create(names: &[&str]) -> Net {
        // Namespace names are files in /run/netns: the PID and a counter keep them
        // apart from every other test's.
        let prefix = unique("tsk").replace('-', "");
        let prefix = format!("tsk-{}-{}", std::process::id(), &prefix[prefix.len() - 6..]);
        let sockets = tempfile::Builder::new()
            .prefix("tsk-net")
            .tempdir()
            .expect("socket dir");
        let switch = format!("{prefix}-sw");
        let mut net = Net {
            prefix: prefix.clone(),
            switch: switch.clone(),
            hosts: Vec::new(),
            amqp_sock: sockets.path().join("amqp.sock"),
            sockets,
            helpers: Vec::new(),
        };
        run("ip", &["netns", "add", &switch]);
        run(
            "ip",
            &["-n", &switch, "link", "add", "br0", "type", "bridge"],
        );
        run("ip", &["-n", &switch, "link", "set", "br0", "up"]);
        for (i, name) in names.iter().enumerate() {
            let ns = format!("{prefix}-{name}");
            let addr = format!("{SUBNET}.{}", 11 + i);
            run("ip", &["netns", "add", &ns]);
            net.hosts.push((ns.clone(), addr.clone()));
            // Both ends made inside their namespaces: no name is taken in the host's.
            let port = format!("p{i}");
            run(
                "ip",
                &[
                    "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                    "netns", &switch,
                ],
            );
            run(
                "ip",
                &["-n", &switch, "link", "set", &port, "master", "br0"],
            );
            run("ip", &["-n", &switch, "link", "set", &port, "up"]);
            run("ip", &["-n", &ns, "link", "set", "lo", "up"]);
            run(
                "ip",
                &[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{addr}/24"),
                    "dev",
                    "eth0",
                ],
            );
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
        }
        net.bridge_amqp();
        net
    }

    pub(super) fn ns(&self, name: &str) -> &str {
        &self.host(name).0
    }

    pub(super) fn addr(&self, name: &str) -> &str {
        &self.host(name).1
    }

    pub(super) fn host(&self, name: &str) -> &(String, String) {
        let ns = format!("{}-{name}", self.prefix);
        self.hosts
            .iter()
            .find(|(n, _)| *n == ns)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    pub(super) fn spawn_helper(&mut self, program: &str, args: &[&str]) {
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
        self.helpers.push(child);
    }

    /// Whether something listens on TCP `port` in namespace `ns`.
    pub(super) fn listening(ns: &str, port: u16) -> bool {
        Command::new("ip")
            .args(["netns", "exec", ns, "ss", "-Hltn"])
            .arg(format!("sport = :{port}"))
            .output()
            .is_ok_and(|o| !o.stdout.is_empty())
    }

    /// Host: `socat UNIX-LISTEN:SOCK,fork TCP:127.0.0.1:5672`; each namespace:
    /// `socat TCP-LISTEN:5672,bind=127.0.0.1,fork,reuseaddr UNIX-CONNECT:SOCK`.
    pub(super) fn bridge_amqp(&mut self) {
        let sock = self.amqp_sock.display().to_string();
        self.spawn_helper(
            "socat",
            &[&format!("UNIX-LISTEN:{sock},fork"), "TCP:127.0.0.1:5672"],
        );
        wait_for(
            "the host's AMQP bridge socket",
            Duration::from_secs(10),
            || Path::new(&sock).exists(),
        );
        let namespaces: Vec<String> = self.hosts.iter().map(|(n, _)| n.clone()).collect();
        for ns in &namespaces {
            self.spawn_helper(
                "ip",
                &[
                    "netns",
                    "exec",
                    ns,
                    "socat",
                    "TCP-LISTEN:5672,bind=127.0.0.1,fork,reuseaddr",
                    &format!("UNIX-CONNECT:{sock}"),
                ],
            );
        }
        for ns in &namespaces {
            wait_for(
                &format!("the AMQP bridge in {ns}"),
                Duration::from_secs(10),
                || Net::listening(ns, 5672),
            );
        }
    }

    /// Make `ADDR:PORT` of host `name` reachable at `127.0.0.1:HOSTPORT` of the host,
    /// for the test's client: in the namespace `socat UNIX-LISTEN:SOCK,fork
    /// TCP:ADDR:PORT`, on the host `socat TCP-LISTEN:HOSTPORT,bind=127.0.0.1,fork,reuseaddr
    /// UNIX-CONNECT:SOCK`. Returns `http://127.0.0.1:HOSTPORT`.
    pub(super) fn expose(&mut self, name: &str, port: u16) -> String {
        let (ns, addr) = self.host(name).clone();
        let sock = self
            .sockets
            .path()
            .join(format!("api-{name}.sock"))
            .display()
            .to_string();
        self.spawn_helper(
            "ip",
            &[
                "netns",
                "exec",
                &ns,
                "socat",
                &format!("UNIX-LISTEN:{sock},fork"),
                &format!("TCP:{addr}:{port}"),
            ],
        );
        wait_for(
            &format!("the API bridge of {name}"),
            Duration::from_secs(10),
            || Path::new(&sock).exists(),
        );
        let host_port = free_port();
        self.spawn_helper(
            "socat",
            &[
                &format!("TCP-LISTEN:{host_port},bind=127.0.0.1,fork,reuseaddr"),
                &format!("UNIX-CONNECT:{sock}"),
            ],
        );
        wait_for("the host's API bridge", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", host_port)).is_ok()
        });
        format!("http://127.0.0.1:{host_port}")
    }

    /// Cut host `name` off the bridge (its veth down, inside its namespace) or put it
    /// back. Its loopback, and so its RabbitMQ bridge, stays.
    pub(super) fn link(&self, name: &str, up: bool) {
        let state = if up { "up" } else { "down" };
        run(
            "ip",
            &[
                "netns",
                "exec",
                self.ns(name),
                "ip",
                "link",
                "set",
                "eth0",
                state,
            ],
        );
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for child in &mut self.helpers {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Anything still running in a namespace is one of this test's processes (its
        // namespaces are its own): kill it by PID before the namespace goes.
        let all: Vec<String> = self
            .hosts
            .iter()
            .map(|(n, _)| n.clone())
            .chain([self.switch.clone()])
            .collect();
        for ns in &all {
            let pids = Command::new("ip")
                .args(["netns", "pids", ns])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            for pid in pids.split_whitespace() {
                eprintln!("clean-up: killing pid {pid} left in {ns}");
                run_quiet("kill", &["-KILL", pid]);
            }
        }
        for ns in &all {
            run_quiet("ip", &["netns", "del", ns]);
        }
    }
}

// ---------------------------------------------------------------------------------
// PostgreSQL of the test's own
