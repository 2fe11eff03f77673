//! STARTTLS with certificates made by the test: libnbd (nbdinfo), qemu and our own client
//! connect; clients without TLS or without a client certificate are refused.

use std::process::Command;

use thinbd_protocol::client::{Client, ClientOptions};
use thinbd_protocol::tls::client_connector;
use thinbd_tests::{Server, assert_no_secrets, make_certs, require, run, runtime};
use tokio_rustls::rustls::pki_types::ServerName;

fn tls_server(dir: &std::path::Path) -> Server {
    make_certs(dir);
    let p = |f: &str| dir.join(f).display().to_string();
    let s = Server::start_logged(
        &["--tls-cert", &p("server-cert.pem"), "--tls-key", &p("server-key.pem"), "--tls-client-ca", &p("ca-cert.pem")],
        "trace",
    );
    s.create_volume("secure", "16MiB");
    s
}

#[test]
fn own_client_over_tls_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let s = tls_server(dir.path());
    let rt = runtime();
    let d = dir.path();
    rt.block_on(async {
        let name = ServerName::try_from("localhost").unwrap();
        let with_cert =
            client_connector(&d.join("ca-cert.pem"), Some((&d.join("client-cert.pem"), &d.join("client-key.pem"))))
                .unwrap();
        let mut opts = ClientOptions::new("secure");
        opts.tls = Some((with_cert, name.clone()));
        let c = Client::connect(s.addr(), opts).await.expect("TLS with client certificate");
        c.write(4096, b"over tls", 0).await.unwrap();
        assert_eq!(c.read(4096, 8).await.unwrap(), b"over tls");
        c.disconnect().await.unwrap();

        // Plain text: every option is refused with ERR_TLS_REQD.
        let err = Client::connect(s.addr(), ClientOptions::new("secure")).await.err().expect("plain refused");
        assert!(err.to_string().contains(&format!("{:#x}", thinbd_protocol::consts::REP_ERR_TLS_REQD)), "{err}");

        // TLS without a client certificate: the handshake fails.
        let no_cert = client_connector(&d.join("ca-cert.pem"), None).unwrap();
        let mut opts = ClientOptions::new("secure");
        opts.tls = Some((no_cert, name));
        let r = async {
            let c = Client::connect(s.addr(), opts).await?;
            c.read(0, 512).await
        }
        .await;
        assert!(r.is_err(), "a client without a certificate must not get data");
    });
    assert!(s.log_text().contains("tls=true"));
    let keys = key_material(d);
    assert_no_secrets("thinbd", &s.log_text(), &keys.iter().map(String::as_str).collect::<Vec<_>>());
}

/// The base64 lines of the test's private keys.
fn key_material(dir: &std::path::Path) -> Vec<String> {
    ["server-key.pem", "client-key.pem"]
        .iter()
        .flat_map(|f| std::fs::read_to_string(dir.join(f)).unwrap().lines().map(str::to_string).collect::<Vec<_>>())
        .filter(|l| !l.starts_with("-----"))
        .collect()
}

#[test]
fn nbdinfo_and_qemu_over_tls() {
    if !require("nbdinfo") || !require("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = tls_server(dir.path());
    let d = dir.path().display().to_string();
    let uri = format!("nbds://localhost:{}/secure?tls-certificates={d}", s.nbd_port);
    let out = run(Command::new("nbdinfo").arg("--json").arg(&uri));
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["TLS"], true, "{j}");
    assert_eq!(j["exports"][0]["export-size"], 16u64 << 20);

    let obj = format!("tls-creds-x509,id=tls0,endpoint=client,dir={d}");
    let image = format!("driver=nbd,host=localhost,port={},export=secure,tls-creds=tls0", s.nbd_port);
    let out = run(Command::new("qemu-io").args([
        "--object",
        &obj,
        "--image-opts",
        &image,
        "-c",
        "write -P 0x5a 0 64k",
        "-c",
        "read -P 0x5a 0 64k",
    ]));
    assert!(!out.contains("verification failed"), "{out}");

    // Without TLS, libnbd gets nowhere.
    let plain = Command::new("nbdinfo").arg(s.uri("secure")).output().unwrap();
    assert!(!plain.status.success());
}

/// The management API with mutual TLS: the CLI and the CSI controller get in with a client
/// certificate from the CA; without one, or over plain http, they do not.
#[test]
fn management_api_requires_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let p = |f: &str| dir.path().join(f).display().to_string();
    let s = Server::start_logged(
        &[
            "--api-tls-cert",
            &p("server-cert.pem"),
            "--api-tls-key",
            &p("server-key.pem"),
            "--api-tls-client-ca",
            &p("ca-cert.pem"),
        ],
        "trace",
    );
    let tls_args =
        ["--api-ca", &p("ca-cert.pem"), "--api-cert", &p("client-cert.pem"), "--api-key", &p("client-key.pem")];
    let mut args = vec!["volume", "create", "v", "--size", "1MiB"];
    args.extend_from_slice(&tls_args);
    let out = s.cli_output(&args);
    assert!(out.status.success(), "with a client certificate: {}", String::from_utf8_lossy(&out.stderr));
    let plain = s.cli_output(&["volume", "list"]);
    assert!(!plain.status.success(), "plain http got in");

    let api = format!("127.0.0.1:{}", s.api_port);
    let ctl = thinbd_tests::CsiPlugin::start_with(
        "controller",
        &api,
        "n",
        &[
            "--thinbd-api-ca",
            &p("ca-cert.pem"),
            "--thinbd-api-cert",
            &p("client-cert.pem"),
            "--thinbd-api-key",
            &p("client-key.pem"),
        ],
    );
    let bare = thinbd_tests::CsiPlugin::start("controller", &api, "n");
    runtime().block_on(async {
        use thinbd_api::csi::identity_client::IdentityClient;
        let mut ok = IdentityClient::new(ctl.channel().await);
        assert_eq!(ok.probe(thinbd_api::csi::ProbeRequest {}).await.unwrap().into_inner().ready, Some(true));
        let mut no = IdentityClient::new(bare.channel().await);
        assert!(no.probe(thinbd_api::csi::ProbeRequest {}).await.is_err(), "controller without TLS got in");
    });
    let keys = key_material(dir.path());
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    assert_no_secrets("thinbd", &s.log_text(), &keys);
    assert_no_secrets("thinbd-csi", &ctl.log_text(), &keys);
}
