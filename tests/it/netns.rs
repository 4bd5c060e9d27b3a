//! A network of the test's own, to cut on purpose: a network namespace with
//! a veth pair to the host, and TCP relays on either side of it.
//!
//! The link is cut by setting the namespace's end down, with a permanent
//! neighbour entry on the host's end, so packets vanish (no reset, no ARP
//! failure) as in a real partition. A `blackhole` route of low priority for
//! the test subnet makes sure no packet of it ever leaves by the default
//! route while the link is down. Only addresses inside the subnet the test
//! made are used, and everything is removed when the [`Link`] is dropped,
//! also when the test fails.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A namespace and the veth pair that links it to the host.
pub struct Link {
    ns: String,
    host_if: String,
    ns_if: String,
    subnet: String,
    /// The host's end of the link.
    pub host_ip: String,
    /// The namespace's end of the link.
    pub ns_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2) runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Link {
    /// Creates the namespace, the veth pair and the guard route.
    pub fn new() -> Link {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        // The owner's pid in every name: scripts/test removes what a test
        // process that is gone left behind, and nothing of a live one.
        let pid = std::process::id();
        let net = 1 + (pid * 7 + n * 31) % 250;
        let link = Link {
            ns: format!("normalizer-{pid}-{n}"),
            host_if: format!("nzh{pid}x{n}"),
            ns_if: format!("nzn{pid}x{n}"),
            subnet: format!("10.213.{net}.0/24"),
            host_ip: format!("10.213.{net}.1"),
            ns_ip: format!("10.213.{net}.2"),
        };
        // From here on, Drop removes whatever was made.
        ip(&["netns", "add", &link.ns]);
        ip(&[
            "link",
            "add",
            &link.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &link.ns_if,
        ]);
        ip(&["link", "set", &link.ns_if, "netns", &link.ns]);
        ip(&["route", "add", "blackhole", &link.subnet, "metric", "4000"]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", link.host_ip),
            "dev",
            &link.host_if,
        ]);
        ip(&["link", "set", &link.host_if, "up"]);
        link.in_ns(&[
            "addr",
            "add",
            &format!("{}/24", link.ns_ip),
            "dev",
            &link.ns_if,
        ]);
        link.in_ns(&["link", "set", "lo", "up"]);
        link.in_ns(&["link", "set", &link.ns_if, "up"]);
        link
    }

    /// The subnet of the link, as a CIDR.
    pub fn subnet(&self) -> &str {
        &self.subnet
    }

    fn in_ns(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.ns, "ip"];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Cuts the link: packets in both directions vanish.
    pub fn cut(&self) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "cat"])
            .arg(format!("/sys/class/net/{}/address", self.ns_if))
            .output()
            .expect("ip netns exec runs");
        let mac = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(!mac.is_empty(), "the namespace end's MAC address");
        ip(&[
            "neigh",
            "replace",
            &self.ns_ip,
            "lladdr",
            &mac,
            "dev",
            &self.host_if,
            "nud",
            "permanent",
        ]);
        self.in_ns(&["link", "set", &self.ns_if, "down"]);
    }

    /// Heals the link.
    pub fn heal(&self) {
        self.in_ns(&["link", "set", &self.ns_if, "up"]);
    }

    /// Moves the calling thread into the namespace; threads it starts
    /// afterwards are in it too.
    pub fn enter(&self) {
        let f = File::open(format!("/var/run/netns/{}", self.ns)).expect("the namespace exists");
        // SAFETY: setns with a valid namespace descriptor only changes this
        // thread's network namespace.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["route", "del", "blackhole", &self.subnet, "metric", "4000"])
            .output();
    }
}

/// A plain TCP relay, as pgbouncer in session mode or HAProxy sit between a
/// client and PostgreSQL: it keeps the client's connection up whatever
/// happens to its own connection upstream.
pub struct Relay {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    /// Listens on `ip` (a free port) and relays each connection to
    /// `target`; inside `link`'s namespace when given.
    pub fn start(ip: &str, target: SocketAddr, inside: Option<&Link>) -> Relay {
        let stop = Arc::new(AtomicBool::new(false));
        let streams: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (tx, rx) = crossbeam_channel::bounded(1);
        let ns = inside.map(|l| l.ns.clone());
        let ip = ip.to_string();
        let (stop2, streams2) = (stop.clone(), streams.clone());
        std::thread::spawn(move || {
            if let Some(ns) = ns {
                let f = File::open(format!("/var/run/netns/{ns}")).unwrap();
                // SAFETY: as in Link::enter.
                assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            }
            let listener = TcpListener::bind((ip.as_str(), 0)).unwrap();
            listener.set_nonblocking(true).unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let streams = streams2.clone();
                        std::thread::spawn(move || relay(client, target, &streams));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Relay {
            addr: rx.recv().unwrap(),
            stop,
            streams,
        }
    }
}

fn relay(client: TcpStream, target: SocketAddr, streams: &Mutex<Vec<TcpStream>>) {
    let Ok(upstream) = TcpStream::connect(target) else {
        return;
    };
    {
        let mut all = streams.lock().unwrap();
        all.push(client.try_clone().unwrap());
        all.push(upstream.try_clone().unwrap());
    }
    let pump = |mut from: TcpStream, mut to: TcpStream| {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    };
    let (c2, u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
    let up = std::thread::spawn(move || pump(c2, u2));
    pump(upstream, client);
    let _ = up.join();
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for s in self.streams.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}
