//! The dependency arrows of the design hold: `protocol` stays pure data,
//! `worker-kernels` knows nothing of the network, and neither knows the other.

use alliance_tests::dependency_names;

fn assert_absent(package: &str, forbidden: &[&str]) {
    let deps = dependency_names(package).unwrap();
    assert!(
        deps.iter().any(|d| d == package),
        "cargo tree did not list {package} itself: {deps:?}"
    );
    let found: Vec<&String> = deps
        .iter()
        .filter(|d| forbidden.contains(&d.as_str()))
        .collect();
    assert!(found.is_empty(), "{package} must not depend on {found:?}");
}

#[test]
fn protocol_is_pure_data() {
    let _scenario = alliance_tests::scenario(module_path!());
    assert_absent(
        "alliance-protocol",
        &[
            "tokio",
            "async-std",
            "mio",
            "libp2p",
            "libp2p-swarm",
            "libp2p-core",
            "libp2p-tcp",
            "libp2p-quic",
            "sled",
            "wgpu",
            "wgpu-core",
            "wgpu-hal",
            "naga",
            "alliance-kernels",
            "alliance-node",
        ],
    );
}

#[test]
fn kernels_know_nothing_of_the_network() {
    let _scenario = alliance_tests::scenario(module_path!());
    assert_absent(
        "alliance-kernels",
        &[
            "tokio",
            "libp2p",
            "libp2p-swarm",
            "libp2p-core",
            "libp2p-identity",
            "sled",
            "alliance-protocol",
            "alliance-node",
        ],
    );
}

#[test]
fn the_check_sees_real_dependencies() {
    let _scenario = alliance_tests::scenario(module_path!());
    // Guards the two tests above against a cargo tree that lists nothing.
    let deps = dependency_names("alliance-kernels").unwrap();
    assert!(deps.iter().any(|d| d == "wgpu"), "{deps:?}");
    let deps = dependency_names("alliance-protocol").unwrap();
    assert!(deps.iter().any(|d| d == "ed25519-dalek"), "{deps:?}");
}
