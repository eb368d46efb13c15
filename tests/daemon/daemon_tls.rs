//! TLS with a client certificate, plus username and `password_file`, against a
//! Mosquitto that requires all three; the password never shows in the log.

use std::path::Path;
use std::process::Command;

use crate::helpers::*;
use crate::trials::{test, Test};
use rumqttc::{MqttOptions, TlsConfiguration, Transport};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files.
pub(crate) fn make_pki(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=test-ca",
        ],
    );
    for (name, ext) in [
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.crt"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
}

fn tls_client_certificate_and_password_file() {
    // Needs Mosquitto, mosquitto_passwd and openssl: see `tests()`.
    let bin = mosquitto().expect("mosquitto");
    let port = free_port();
    let pki = tempfile::tempdir().unwrap();
    let p = pki.path();
    make_pki(p);
    let secret = "s3cret-Pa55";
    let passwd = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(p.join("passwd"))
        .args(["edge", secret])
        .output();
    match passwd {
        Ok(o) if o.status.success() => {}
        other => panic!("mosquitto_passwd (from mosquitto): {other:?}"),
    }
    std::fs::write(p.join("mqtt-password"), format!("{secret}\n")).unwrap();
    for secret_file in ["mqtt-password", "client.key"] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p.join(secret_file), std::fs::Permissions::from_mode(0o600))
            .unwrap();
    }
    let broker_dir = p.join("broker");
    std::fs::create_dir_all(&broker_dir).unwrap();
    let conf = broker_dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {pki}/passwd\n\
             cafile {pki}/ca.crt\ncertfile {pki}/server.crt\nkeyfile {pki}/server.key\n\
             require_certificate true\nuser root\n",
            pki = p.display()
        ),
    )
    .unwrap();
    let mut broker = Command::new(&bin)
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start mosquitto");
    let q = |f: &str| toml::Value::String(p.join(f).display().to_string()).to_string();
    let env = Env::new(
        port,
        &format!(
            "[mqtt]\nusername = \"edge\"\npassword_file = {}\n[mqtt.tls]\nca = {}\nclient_cert = {}\nclient_key = {}\n",
            q("mqtt-password"),
            q("ca.crt"),
            q("client.crt"),
            q("client.key")
        ),
        &[],
    );

    let _ = rustls::crypto::ring::default_provider().install_default();
    let read = |f: &str| std::fs::read(p.join(f)).unwrap();
    let mut o = MqttOptions::new("tls-dashboard", "127.0.0.1", port);
    o.set_credentials("edge", secret);
    o.set_transport(Transport::Tls(TlsConfiguration::Simple {
        ca: read("ca.crt"),
        alpn: None,
        client_auth: Some((read("client.crt"), read("client.key"))),
    }));
    let mut daemon = Daemon::start(&env, &[]);
    let mut dash = Dashboard::connect_with(o, &env.base_topic());
    let status = dash.topic("status");
    if dash.find_from(0, SHORT, |m| m.topic == status).is_none() {
        let _ = broker.kill();
        panic!("no status over TLS\n{}", daemon.log_text());
    }
    dash.send("train", r#"{"request_id": "tls"}"#);
    let events = dash.topic("events");
    let promoted = dash.find_from(0, LONG, |m| {
        m.topic == events && m.event() == "model_promoted"
    });
    daemon.sigterm();
    let code = daemon.wait_exit(SHORT).map(|s| s.code());
    let _ = broker.kill();
    let _ = broker.wait();
    let log = daemon.log_text();
    assert!(promoted.is_some(), "no run over TLS\n{log}");
    assert_eq!(code, Some(Some(0)), "{log}");
    assert!(log.contains("connected to the MQTT broker"), "{log}");
    assert!(!log.contains(secret), "the password must never be logged");
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![test!(tls_client_certificate_and_password_file)
        .needs(MOSQUITTO)
        .needs(MOSQUITTO_PASSWD)
        .needs(OPENSSL)]
}
