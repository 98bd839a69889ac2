//! `meshd::discovery::kubernetes::connect` finds the API server through `KUBECONFIG` and says what
//! to do when it cannot. Alone in its test binary: it sets an environment variable, which is only
//! sound while no other thread runs.

#[path = "support/apiserver.rs"]
mod apiserver;

use meshd::discovery::kubernetes;

#[test]
fn connect_follows_kubeconfig_and_names_the_fix_when_there_is_none() {
    let dir = tempfile::tempdir().unwrap();
    // No thread but this one (and the harness's, waiting) exists: a current-thread runtime.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        std::env::remove_var("KUBERNETES_SERVICE_HOST");
        std::env::set_var("KUBECONFIG", dir.path().join("missing"));
        let Err(e) = kubernetes::connect().await else {
            panic!("a client without any configuration");
        };
        let e = e.to_string();
        assert!(e.contains("KUBECONFIG"), "{e}");
        assert!(e.contains("kubernetes = false"), "{e}");

        let server = apiserver::ApiServer::start().await;
        let config = dir.path().join("kubeconfig");
        server.write_kubeconfig(&config);
        std::env::set_var("KUBECONFIG", &config);
        let client = kubernetes::connect()
            .await
            .expect("a client from KUBECONFIG");
        let resources = client
            .list_api_group_resources("multicluster.x-k8s.io/v1alpha1")
            .await
            .expect("discovery through the client");
        assert!(resources
            .resources
            .iter()
            .any(|r| r.name == "serviceexports"));
    });
}
