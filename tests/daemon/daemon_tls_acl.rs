//! MQTT over TLS against a real Mosquitto that requires client certificates,
//! usernames/passwords (`mosquitto_passwd`) and an ACL file: the device may
//! only use topics under its own prefix. The daemon connects with its client
//! certificate and password and is commanded on its own topics; a client with
//! a valid certificate but no rights to publish there cannot command it.
//! Certificates are made in the test with the `openssl` CLI.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::helpers::*;
use crate::trials::{test, Test};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde_json::Value;

fn sh(dir: &Path, script: &str) {
    let o = Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{script}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and client certificates.
fn make_certs(dir: &Path, clients: &[&str]) {
    sh(
        dir,
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
         -keyout ca.key -out ca.crt -days 2 -subj /CN=test-ca 2>/dev/null",
    );
    let mut names = vec!["server"];
    names.extend_from_slice(clients);
    for name in names {
        sh(
            dir,
            &format!(
                "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
                 -keyout {name}.key -out {name}.csr -subj /CN={name} 2>/dev/null && \
                 printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n' > {name}.ext && \
                 openssl x509 -req -in {name}.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
                 -out {name}.crt -days 2 -extfile {name}.ext 2>/dev/null && chmod 600 {name}.key"
            ),
        );
    }
}

/// A TLS client (certificate + password) collecting what it receives.
struct Tls {
    client: Client,
    rx: mpsc::Receiver<(String, Value)>,
    acks: mpsc::Receiver<()>,
    seen: Vec<(String, Value)>,
}

impl Tls {
    fn connect(dir: &Path, port: u16, name: &str, password: &str, subscribe: &str) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut o = MqttOptions::new(
            format!("{name}-{}", rand::random::<u32>()),
            "127.0.0.1",
            port,
        );
        o.set_keep_alive(Duration::from_secs(5));
        o.set_credentials(name, password);
        o.set_transport(Transport::Tls(TlsConfiguration::Simple {
            ca: std::fs::read(dir.join("ca.crt")).unwrap(),
            alpn: None,
            client_auth: Some((
                std::fs::read(dir.join(format!("{name}.crt"))).unwrap(),
                std::fs::read(dir.join(format!("{name}.key"))).unwrap(),
            )),
        }));
        let (client, mut conn) = Client::new(o, 64);
        let (tx, rx) = mpsc::channel();
        let (ack_tx, acks) = mpsc::channel();
        let (sub_tx, sub_rx) = mpsc::channel();
        let c2 = client.clone();
        let filter = subscribe.to_string();
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = c2.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = sub_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        let _ = ack_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let v = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        if tx.send((p.topic.clone(), v)).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        sub_rx
            .recv_timeout(SHORT)
            .unwrap_or_else(|_| panic!("{name} did not connect over TLS and subscribe"));
        Self {
            client,
            rx,
            acks,
            seen: Vec::new(),
        }
    }

    fn publish(&self, topic: &str, payload: &str) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
            .unwrap();
        self.acks
            .recv_timeout(SHORT)
            .expect("the broker acknowledged the publish");
    }

    fn wait(&mut self, what: &str, pred: impl Fn(&str, &Value) -> bool) -> usize {
        let t0 = Instant::now();
        loop {
            if let Some(i) = self.seen.iter().position(|(t, v)| pred(t, v)) {
                return i;
            }
            assert!(
                t0.elapsed() < LONG,
                "timed out waiting for {what}: {:?}",
                self.seen
            );
            if let Ok(m) = self.rx.recv_timeout(Duration::from_millis(100)) {
                self.seen.push(m);
            }
        }
    }
}

fn tls_client_cert_password_and_acl_against_mosquitto() {
    // Needs Mosquitto, mosquitto_passwd and openssl: see `tests()`.
    let bin = mosquitto().expect("mosquitto");
    let port = free_port();
    let pki = tempfile::tempdir().unwrap();
    let p = pki.path();
    make_certs(p, &["device", "operator", "intruder"]);
    let q = |n: &str| p.join(n).display().to_string();
    std::fs::write(p.join("password"), "devpw\n").unwrap();
    std::fs::set_permissions(p.join("password"), std::fs::Permissions::from_mode(0o600)).unwrap();
    // The daemon's side: TLS with its certificate, username and password file.
    let env = Env::new(
        port,
        &format!(
            "[mqtt]\nusername = \"device\"\npassword_file = {:?}\n[mqtt.tls]\nca = {:?}\nclient_cert = {:?}\nclient_key = {:?}\n",
            q("password"),
            q("ca.crt"),
            q("device.crt"),
            q("device.key"),
        ),
        &[],
    );
    let device = env.device_id.clone();
    sh(
        p,
        "mosquitto_passwd -c -b passwd device devpw && mosquitto_passwd -b passwd operator oppw \
         && mosquitto_passwd -b passwd intruder inpw && chmod 600 passwd",
    );
    std::fs::write(
        p.join("acl"),
        format!(
            "user device\ntopic readwrite et/{device}/#\n\n\
             user operator\ntopic readwrite et/#\n\n\
             user intruder\ntopic read et/#\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(p.join("acl"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let conf = p.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "per_listener_settings false\nuser root\nallow_anonymous false\n\
             password_file {}\nacl_file {}\n\
             listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n\
             require_certificate true\ntls_version tlsv1.2\n\
             log_type all\nlog_dest file {}\n",
            q("passwd"),
            q("acl"),
            q("ca.crt"),
            q("server.crt"),
            q("server.key"),
            q("mosquitto.log"),
        ),
    )
    .unwrap();
    let mut broker = Command::new(&bin)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed() < SHORT, "mosquitto did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }

    let base = env.base_topic();
    let mut op = Tls::connect(p, port, "operator", "oppw", &format!("{base}/#"));
    let mut daemon = Daemon::start(&env, &[]);
    let status = format!("{base}/status");
    let events = format!("{base}/events");
    op.wait("the daemon's status over TLS", |t, v| {
        t == status && v["state"] == "idle"
    });

    // A client with a valid certificate but read-only rights cannot command it.
    let intruder = Tls::connect(p, port, "intruder", "inpw", "et/#");
    intruder.publish(&format!("{base}/cmd/train"), r#"{"request_id": "evil"}"#);
    // The operator (who has the rights) asks for a status and then trains.
    op.publish(&format!("{base}/cmd/status"), "{}");
    op.publish(
        &format!("{base}/cmd/train"),
        r#"{"request_id": "op", "overrides": {"train.max_epochs": 2}}"#,
    );
    let started = op.wait("run_started for the operator", |t, v| {
        t == events && v["event"] == "run_started"
    });
    assert_eq!(
        op.seen[started].1["request_ids"],
        serde_json::json!(["op"]),
        "only the operator's request may start a run"
    );
    op.wait("run_finished", |t, v| {
        t == events && v["event"] == "run_finished"
    });
    assert!(
        !op.seen.iter().any(|(_, v)| v["request_id"] == "evil"
            || v["request_ids"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == "evil"))),
        "the intruder's command reached the daemon: {:?}",
        op.seen
    );
    let log = std::fs::read_to_string(p.join("mosquitto.log")).unwrap_or_default();
    assert!(
        log.contains("Denied PUBLISH") || log.contains("denied"),
        "mosquitto logged no denial: {log}"
    );
    daemon.sigterm();
    assert!(daemon.wait_exit(LONG).is_some_and(|s| s.success()));
    let _ = broker.kill();
    let _ = broker.wait();
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![test!(tls_client_cert_password_and_acl_against_mosquitto)
        .needs(MOSQUITTO)
        .needs(MOSQUITTO_PASSWD)
        .needs(OPENSSL)]
}
