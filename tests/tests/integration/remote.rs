//! The API beyond loopback: only over TLS, and refused in plaintext.

use alliance_protocol::cert::Roles;
use alliance_tests::alliance::TestAlliance;

#[test]
fn the_api_off_loopback_needs_tls_and_serves_https_with_it() {
    let _scenario = alliance_tests::scenario(module_path!());
    let a = TestAlliance::new("TLS Test", &[("University North", Roles::ALL)], 30);

    // Plaintext on every address: refused, with the fix.
    let open = a.node("open", 0, Roles::BOOTSTRAP);
    open.edit_config("listen = \"127.0.0.1:0\"", "listen = \"0.0.0.0:0\"");
    let out = std::process::Command::new(alliance_tests::alliance_bin())
        .args(["node", "run", "--bootstrap", "--data-dir"])
        .arg(&open.path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("not a loopback address") && text.contains("tls_cert"),
        "{text}"
    );

    // With a certificate: HTTPS, which the node's own commands trust.
    let node = a.node("tls", 0, Roles::BOOTSTRAP);
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    std::fs::write(node.path.join("api.crt"), cert.cert.pem()).unwrap();
    std::fs::write(node.path.join("api.key"), cert.key_pair.serialize_pem()).unwrap();
    node.edit_config(
        "# tls_cert = \"api.crt\"\n# tls_key = \"api.key\"",
        "tls_cert = \"api.crt\"\ntls_key = \"api.key\"",
    );
    let running = node.start(true);
    let url = std::fs::read_to_string(node.path.join("api.url")).unwrap();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let status = running.get("/v1/status").expect("status over HTTPS");
    assert!(status["peer_id"].is_string(), "{status}");

    // Plain HTTP to the same port gets no answer.
    let addr = url.trim_start_matches("https://").to_owned();
    let plain = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(15)))
            .unwrap();
        let _ = write!(
            s,
            "GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
    .join()
    .unwrap();
    assert!(
        !plain.contains("200 OK") && !plain.contains("peer_id"),
        "{plain}"
    );

    // A client that does not trust the certificate is refused.
    let api = alliance_node::api::Api::new(&alliance_node::api::Target {
        url: Some(url.clone()),
        token: Some("whatever".into()),
        ..Default::default()
    })
    .unwrap();
    let err = api.get("/v1/status").unwrap_err();
    assert!(format!("{err:#}").contains("no node answers"), "{err:#}");
}
