//! The MQTT source: connect (a refusal is a set-up error), then three
//! threads: events (polls the connection: PUBLISHes in, PUBACKs and
//! keep-alives out, reconnects), feeder (messages into the worker pool)
//! and acks (outcomes in, PUBACKs of the committed prefix out, in order).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use crossbeam_channel::{bounded, unbounded, Receiver, SendTimeoutError, Sender};
use rumqttc::tokio_rustls::rustls;
use rumqttc::{
    Client, ConnAck, ConnectReturnCode, Connection, ConnectionError, Event, Outgoing, Packet,
    Publish, QoS, RecvTimeoutError, SubscribeFilter, SubscribeReasonCode, TlsConfiguration,
    Transport,
};

use super::{token, MqttOptions, MqttStatus};
use crate::core::message::{MAX_LINE_BYTES, MAX_RAW_BYTES};
use crate::input::Line;
use crate::pipeline::{AckWindow, Done, Origin, Workers};

/// The largest packet read from the broker. A message over the line limit
/// (1 MiB) is a dead letter, so it must be read; one over this breaks the
/// connection, and the broker would send it again each time: brokers are
/// told to refuse such packets (README, "MQTT").
pub const MAX_PACKET_BYTES: usize = 16 * 1024 * 1024;

/// How long the events thread waits for the connection before it looks
/// whether the source is ending.
const POLL: Duration = Duration::from_millis(200);

/// Messages handed from the events thread to the feeder at most. Past it
/// the events thread waits, and TCP holds the broker back: mosquitto 2.0
/// keeps to its in-flight window while a session stays connected, but
/// after a reconnect it sent a whole backlog at once.
const HAND_OFF: usize = 1024;

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The broker refused this client (credentials, authorization, TLS, a
    /// subscription): a set-up error.
    #[error("{0}")]
    Refused(String),
    /// A setting the client cannot use (a certificate file, say).
    #[error("{0}")]
    Setup(String),
}

/// A message on its way from the events thread to the feeder.
struct Received {
    position: u64,
    publish: Publish,
    token: String,
}

/// A message handed out and not yet acknowledged: what its PUBACK needs,
/// and the connection it came on (an ack on a later connection would
/// acknowledge a packet id the broker may have given to another message).
struct Pending {
    connection: u64,
    publish: Publish,
}

/// The acknowledgement window and the connection it belongs to.
#[derive(Default)]
struct Inflight {
    window: AckWindow<Pending>,
    /// Counts connections: a message of an earlier one is not acknowledged
    /// (the broker sends it again on the new one).
    connection: u64,
}

/// The MQTT source of one `serve`.
pub struct Source {
    options: MqttOptions,
    client: Client,
    connection: Mutex<Option<Connection>>,
    /// Messages that came while the subscription was made at start.
    early: Mutex<Vec<Publish>>,
    status: Arc<MqttStatus>,
    inflight: Mutex<Inflight>,
    next_position: AtomicU64,
    lines: (Sender<Received>, Receiver<Received>),
    /// No new message is handed out (shutdown began).
    stop_reading: AtomicBool,
    /// The events thread disconnects and ends.
    ending: AtomicBool,
}

impl Source {
    /// Connects to the broker and subscribes, waiting as long as it takes
    /// for a broker that is not up, and returning a refusal (credentials,
    /// TLS, a refused subscription) at once. `None` when `shutdown` came
    /// first.
    pub fn connect(
        options: MqttOptions,
        shutdown: &Receiver<()>,
    ) -> Result<Option<Source>, SourceError> {
        let (client, mut connection) = Client::new(client_options(&options)?, 1024);
        let Some(session_present) = first_connection(&mut connection, &options, shutdown)? else {
            return Ok(None);
        };
        subscribe(&client, &options)?;
        let early = subscribed(&mut connection, &options)?;
        log::info!(
            "mqtt: connected to {} as {} ({} session), subscribed to {} at QoS 1",
            options.address(),
            options.client_id,
            if session_present { "its kept" } else { "a new" },
            options.topics.join(", ")
        );
        Ok(Some(Source {
            options,
            client,
            connection: Mutex::new(Some(connection)),
            early: Mutex::new(early),
            status: Arc::new(MqttStatus::default()),
            inflight: Mutex::new(Inflight::default()),
            next_position: AtomicU64::new(1),
            lines: bounded(HAND_OFF),
            stop_reading: AtomicBool::new(false),
            ending: AtomicBool::new(false),
        }))
    }

    /// The counters the stats line and the metrics show.
    pub fn status(&self) -> Arc<MqttStatus> {
        self.status.clone()
    }

    /// The broker's address, safe to print.
    pub fn address(&self) -> String {
        self.options.address()
    }

    /// Starts the events, feeder and ack threads in `scope`. `on_done` sees
    /// every outcome first.
    pub fn run<'scope, 'env>(
        &'scope self,
        scope: &'scope std::thread::Scope<'scope, 'env>,
        workers: &'scope Workers,
        on_done: &'scope (dyn Fn(&Done) + Sync),
    ) {
        let mut connection = self
            .connection
            .lock()
            .expect("connection lock")
            .take()
            .expect("run once");
        let (reply, acks) = unbounded::<Done>();
        std::thread::Builder::new()
            .name("mqtt-events".into())
            .spawn_scoped(scope, move || self.events(&mut connection))
            .expect("spawn the mqtt events thread");
        std::thread::Builder::new()
            .name("mqtt-feeder".into())
            .spawn_scoped(scope, move || self.feed(workers, reply))
            .expect("spawn the mqtt feeder thread");
        std::thread::Builder::new()
            .name("mqtt-acks".into())
            .spawn_scoped(scope, move || {
                for done in acks.iter() {
                    on_done(&done);
                    self.settled(&done);
                }
            })
            .expect("spawn the mqtt ack thread");
    }

    /// Hands out no new message: what arrives from now on is left to the
    /// broker, which sends it again to the next session.
    pub fn stop_reading(&self) {
        self.stop_reading.store(true, Ordering::SeqCst);
    }

    /// Messages handed to the workers whose outcome is not back.
    pub fn in_flight(&self) -> u64 {
        self.status.in_flight.load(Ordering::SeqCst)
    }

    /// Ends the source: the PUBACKs already given go out, then a
    /// DISCONNECT (the session stays on the broker).
    pub fn end(&self) {
        let unsettled = self.inflight.lock().expect("inflight lock").window.len();
        if unsettled > 0 {
            log::warn!(
                "mqtt: {unsettled} messages not acknowledged at shutdown; the broker sends them again to the next session"
            );
        }
        self.stop_reading();
        // Every outcome that came back had its PUBACKs queued before it
        // left the in-flight count, so this comes after them.
        let _ = self.client.disconnect();
        self.ending.store(true, Ordering::SeqCst);
    }

    /// The events thread: polls the connection until the source ends.
    fn events(&self, connection: &mut Connection) {
        for publish in std::mem::take(&mut *self.early.lock().expect("early lock")) {
            self.receive(publish);
        }
        let mut disconnect_sent: Option<Instant> = None;
        loop {
            if self.ending.load(Ordering::SeqCst) && disconnect_sent.is_none() {
                disconnect_sent = Some(Instant::now());
            }
            if disconnect_sent.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) {
                return;
            }
            match connection.recv_timeout(POLL) {
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => self.receive(p),
                Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => self.reconnected(&ack),
                Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) => {
                    // Give the socket a moment to write what is queued.
                    let _ = connection.recv_timeout(Duration::from_millis(100));
                    return;
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    if disconnect_sent.is_some() {
                        return;
                    }
                    self.lost(&e);
                    // rumqttc reconnects on the next poll: not in a loop.
                    let until = Instant::now() + Duration::from_secs(1);
                    while Instant::now() < until && !self.ending.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        }
    }

    /// One PUBLISH from the broker: into the window, then to the feeder.
    fn receive(&self, publish: Publish) {
        self.status.received.fetch_add(1, Ordering::Relaxed);
        if publish.dup {
            self.status.redelivered.fetch_add(1, Ordering::Relaxed);
        }
        if self.stop_reading.load(Ordering::SeqCst) {
            return;
        }
        let position = self.next_position.fetch_add(1, Ordering::SeqCst);
        let token = match publish.qos {
            // Subscribed at QoS 1, a message published at QoS 0 comes at
            // QoS 0: never sent again, nothing to acknowledge.
            QoS::AtMostOnce => format!("mqtt-qos0:{:032x}", rand::random::<u128>()),
            _ => {
                let mut inflight = self.inflight.lock().expect("inflight lock");
                let pending = Pending {
                    connection: inflight.connection,
                    publish: Publish {
                        payload: Default::default(),
                        ..publish.clone()
                    },
                };
                inflight.window.delivered(position, pending);
                token(
                    &self.options.client_id,
                    publish.pkid,
                    &publish.topic,
                    &publish.payload,
                )
            }
        };
        self.status.in_flight.fetch_add(1, Ordering::SeqCst);
        let mut received = Received {
            position,
            publish,
            token,
        };
        // Waits while the workers are behind (the broker waits meanwhile);
        // a shutdown leaves the message to the broker.
        loop {
            match self.lines.0.send_timeout(received, POLL) {
                Ok(()) => return,
                Err(SendTimeoutError::Timeout(back))
                    if !self.stop_reading.load(Ordering::SeqCst) =>
                {
                    received = back;
                }
                Err(_) => {
                    self.status.in_flight.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
            }
        }
    }

    /// The feeder thread: received messages into the worker pool.
    fn feed(&self, workers: &Workers, reply: Sender<Done>) {
        loop {
            let received = match self.lines.1.recv_timeout(POLL) {
                Ok(received) => received,
                Err(_) if self.ending.load(Ordering::SeqCst) => return,
                Err(_) => continue,
            };
            let payload = &received.publish.payload;
            let oversize = payload.len() > MAX_LINE_BYTES;
            let keep = if oversize {
                payload.len().min(MAX_RAW_BYTES)
            } else {
                payload.len()
            };
            let line = Line {
                number: received.position,
                bytes: payload[..keep].to_vec(),
                oversize,
            };
            let origin = Origin {
                token: received.token,
                fence: None,
            };
            if workers.submit_from(received.position, line, Some(origin), &reply) != Some(true) {
                // The workers are gone: nothing more is applied.
                self.status.in_flight.fetch_sub(1, Ordering::SeqCst);
                return;
            }
        }
    }

    /// One outcome back: PUBACKs for the prefix it completed, in order.
    fn settled(&self, done: &Done) {
        let (released, current) = {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            let released = inflight.window.settled(done.ticket, done.result.is_ok());
            (released, inflight.connection)
        };
        for (_, pending) in released {
            if pending.connection != current {
                continue;
            }
            if self.client.ack(&pending.publish).is_ok() {
                self.status.acknowledged.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Last: a shutdown that saw nothing in flight disconnects after
        // these PUBACKs.
        self.status.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// The connection broke: what was handed out on it is not acknowledged
    /// any more (the broker sends it again); log once per outage.
    fn lost(&self, error: &ConnectionError) {
        {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            inflight.connection += 1;
            inflight.window = AckWindow::default();
        }
        let mut down = self.status.down_since.lock().expect("status lock");
        if let Some(reason) = refusal(error, &self.options) {
            if !self.status.refused.swap(true, Ordering::SeqCst) {
                log::error!(
                    "mqtt: {reason}; nothing is read until the broker lets this client in again"
                );
            }
        } else if down.is_none() {
            log::warn!(
                event = "mqtt_lost", broker = self.options.address().as_str(), error:% = error;
                "mqtt: lost the broker at {} ({error}); reconnecting as long as it takes (what was not acknowledged comes again)",
                self.options.address()
            );
        }
        down.get_or_insert_with(Utc::now);
    }

    /// Connected again: subscribe where the broker forgot the session.
    fn reconnected(&self, ack: &ConnAck) {
        let since = self.status.down_since.lock().expect("status lock").take();
        self.status.refused.store(false, Ordering::SeqCst);
        if let Some(since) = since {
            let seconds = (Utc::now() - since).num_milliseconds() as f64 / 1000.0;
            let session = if ack.session_present {
                "its kept"
            } else {
                "a new"
            };
            log::info!(
                event = "mqtt_back", broker = self.options.address().as_str(), seconds = seconds,
                session_kept = ack.session_present;
                "mqtt: connected to {} again after {seconds:.1} s ({session} session)",
                self.options.address()
            );
        }
        if !ack.session_present {
            if let Err(e) = subscribe(&self.client, &self.options) {
                log::error!("mqtt: {e}");
            }
        }
    }
}

/// The client's options: a persistent session (clean session off) under
/// a fixed client id, manual acknowledgements, TLS where asked for.
pub(super) fn client_options(options: &MqttOptions) -> Result<rumqttc::MqttOptions, SourceError> {
    let mut o = rumqttc::MqttOptions::new(&options.client_id, &options.host, options.port);
    o.set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(MAX_PACKET_BYTES, 1024 * 1024)
        .set_request_channel_capacity(4096);
    if let Some((user, password)) = &options.login {
        o.set_credentials(user, password.expose());
    }
    if options.tls {
        o.set_transport(Transport::tls_with_config(tls(options)?));
    }
    Ok(o)
}

fn tls(options: &MqttOptions) -> Result<TlsConfiguration, SourceError> {
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read(path)
            .map_err(|e| SourceError::Setup(format!("cannot read {what} {}: {e}", path.display())))
    };
    let Some(ca) = &options.ca else {
        if options.client_cert.is_some() {
            return Err(SourceError::Setup(
                "--mqtt-cert needs --mqtt-ca (the CA that signed the broker's certificate)".into(),
            ));
        }
        return Ok(TlsConfiguration::default());
    };
    let client_auth = match &options.client_cert {
        Some((cert, key)) => Some((
            read(cert, "the MQTT client certificate")?,
            read(key, "the MQTT client key")?,
        )),
        None => None,
    };
    Ok(TlsConfiguration::Simple {
        ca: read(ca, "the MQTT CA certificate")?,
        alpn: None,
        client_auth,
    })
}

/// Polls until the broker's CONNACK: whether it kept the session, or
/// `None` when `shutdown` came first. A refusal is returned at once; a
/// broker that is not up is waited for, said once.
fn first_connection(
    connection: &mut Connection,
    options: &MqttOptions,
    shutdown: &Receiver<()>,
) -> Result<Option<bool>, SourceError> {
    let mut waiting_since: Option<Instant> = None;
    let session_present = loop {
        if shutdown.try_recv().is_ok() {
            return Ok(None);
        }
        match connection.recv_timeout(POLL) {
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => break ack.session_present,
            Ok(Ok(_)) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Err(SourceError::Setup("the MQTT client ended".into()))
            }
            Ok(Err(e)) => {
                if let Some(reason) = refusal(&e, options) {
                    return Err(SourceError::Refused(reason));
                }
                if handshake_cut(&e) {
                    return Err(SourceError::Refused(format!(
                        "TLS to the MQTT broker at {}: the server closed the connection during the handshake (does it speak TLS on that port?)",
                        options.address()
                    )));
                }
                if waiting_since.is_none() {
                    log::warn!(
                        "mqtt: waiting for the broker at {} ({e}); as long as it takes",
                        options.address()
                    );
                    waiting_since = Some(Instant::now());
                }
                if shutdown.recv_timeout(Duration::from_secs(1)).is_ok() {
                    return Ok(None);
                }
            }
        }
    };
    if let Some(since) = waiting_since {
        log::info!(
            "mqtt: the broker at {} answered after {:.1} s",
            options.address(),
            since.elapsed().as_secs_f64()
        );
    }
    Ok(Some(session_present))
}

/// Waits for the broker's answer to the subscription: a refused filter is
/// a set-up error. Returns what the kept session delivered meanwhile.
fn subscribed(
    connection: &mut Connection,
    options: &MqttOptions,
) -> Result<Vec<Publish>, SourceError> {
    let mut early = Vec::new();
    let at = options.address();
    let topics = options.topics.join(", ");
    loop {
        match connection.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                let refused: Vec<&str> = ack
                    .return_codes
                    .iter()
                    .zip(&options.topics)
                    .filter(|(code, _)| matches!(code, SubscribeReasonCode::Failure))
                    .map(|(_, topic)| topic.as_str())
                    .collect();
                if refused.is_empty() {
                    return Ok(early);
                }
                return Err(SourceError::Refused(format!(
                    "the MQTT broker at {at} refused the subscription to {} (is this user allowed to read it?)",
                    refused.join(", ")
                )));
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => early.push(p),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(SourceError::Refused(format!(
                    "the MQTT broker at {at} closed the connection on the subscription to {topics} ({e}; is this user allowed to read it?)"
                )))
            }
            Err(RecvTimeoutError::Timeout) => {
                return Err(SourceError::Refused(format!(
                    "the MQTT broker at {at} did not answer the subscription to {topics} within 10 s"
                )))
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(SourceError::Setup("the MQTT client ended".into()))
            }
        }
    }
}

fn subscribe(client: &Client, options: &MqttOptions) -> Result<(), SourceError> {
    let filters = options
        .topics
        .iter()
        .map(|t| SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
    client.subscribe_many(filters).map_err(|e| {
        SourceError::Setup(format!(
            "cannot subscribe to {}: {e}",
            options.topics.join(", ")
        ))
    })
}

/// The sentence for an error that waiting will not cure: the broker said
/// no (credentials, authorization, client id), or TLS failed on a
/// certificate or on a server that does not speak it. `None`: the broker
/// is down or unreachable; wait.
pub(crate) fn refusal(error: &ConnectionError, options: &MqttOptions) -> Option<String> {
    let at = options.address();
    match error {
        ConnectionError::ConnectionRefused(code) => match code {
            ConnectReturnCode::BadUserNamePassword => Some(format!(
                "the MQTT broker at {at} refused the login: bad user name or password"
            )),
            ConnectReturnCode::NotAuthorized => Some(format!(
                "the MQTT broker at {at} refused the login: not authorized (check the user, password or client certificate)"
            )),
            ConnectReturnCode::BadClientId => Some(format!(
                "the MQTT broker at {at} refused the client id {:?}",
                options.client_id
            )),
            ConnectReturnCode::RefusedProtocolVersion => Some(format!(
                "the MQTT broker at {at} refused MQTT 3.1.1"
            )),
            ConnectReturnCode::ServiceUnavailable | ConnectReturnCode::Success => None,
        },
        ConnectionError::Tls(e) => tls_refusal(e, &at),
        ConnectionError::Io(e) => rustls_error(e).and_then(|e| rustls_refusal(e, &at)),
        _ => None,
    }
}

fn tls_refusal(error: &rumqttc::TlsError, at: &str) -> Option<String> {
    use rumqttc::TlsError as E;
    match error {
        E::TLS(e) => rustls_refusal(e, at),
        E::Io(e) => rustls_error(e).and_then(|e| rustls_refusal(e, at)),
        E::NoValidCertInChain => Some("--mqtt-ca holds no certificate".to_string()),
        E::NoValidClientCertInChain => Some("--mqtt-cert holds no certificate".to_string()),
        E::NoValidKeyInChain => Some("--mqtt-key holds no private key".to_string()),
        E::DNSName(_) => Some(format!("{at}: the host is not a valid TLS server name")),
        _ => None,
    }
}

/// A TLS handshake that the server cut off: at start, a server that does
/// not speak TLS on that port (mosquitto closes on the ClientHello, which
/// it cannot read as MQTT). Later it may be a broker going down: waited on.
fn handshake_cut(error: &ConnectionError) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionReset, UnexpectedEof};
    matches!(error, ConnectionError::Tls(rumqttc::TlsError::Io(e))
        if matches!(e.kind(), UnexpectedEof | ConnectionReset | ConnectionAborted))
}

/// The rustls error inside an I/O error of the handshake, if there is one.
fn rustls_error(error: &std::io::Error) -> Option<&rustls::Error> {
    error.get_ref()?.downcast_ref::<rustls::Error>()
}

fn rustls_refusal(error: &rustls::Error, at: &str) -> Option<String> {
    use rustls::{AlertDescription as Alert, CertificateError as Cert, Error};
    Some(match error {
        Error::InvalidCertificate(Cert::UnknownIssuer | Cert::BadSignature) => format!(
            "TLS to the MQTT broker at {at}: certificate verify failed (its certificate is not signed by a CA this client trusts: --mqtt-ca)"
        ),
        Error::InvalidCertificate(Cert::NotValidForName | Cert::NotValidForNameContext { .. }) => {
            format!("TLS to the MQTT broker at {at}: its certificate does not match host name")
        }
        Error::InvalidCertificate(other) => format!(
            "TLS to the MQTT broker at {at}: certificate verify failed ({other:?})"
        ),
        Error::AlertReceived(Alert::BadCertificate | Alert::CertificateRequired) => format!(
            "TLS to the MQTT broker at {at}: the broker refused this client's certificate, or wants one (--mqtt-cert, --mqtt-key)"
        ),
        Error::AlertReceived(alert) => {
            format!("TLS to the MQTT broker at {at}: the broker ended the handshake ({alert:?})")
        }
        Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => format!(
            "TLS to the MQTT broker at {at}: the server does not speak TLS on that port"
        ),
        _ => return None,
    })
}
