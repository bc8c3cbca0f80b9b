//! A real agent on a loopback port 0 with a temporary data directory, for HTTP tests.

use std::path::Path;
use std::sync::Arc;

use deadlift_agent::{Agent, AgentBuilder};
use deadlift_engine::Grant;
use tokio::sync::oneshot;

pub const ADMIN: &str = "test-admin-token-Zq3xV9pL2mR7tK4wY8nB6cH1";

/// A running agent; dropping it stops the server.
pub struct TestAgent {
    pub url: String,
    pub agent: Arc<Agent>,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestAgent {
    pub async fn start(dir: &Path) -> Self {
        Self::start_with(dir, |b| b).await
    }

    pub async fn start_with(
        dir: &Path,
        configure: impl FnOnce(AgentBuilder) -> AgentBuilder,
    ) -> Self {
        Self::start_on(dir, "127.0.0.1:0", configure).await
    }

    /// An agent listening on `address` (reached through 127.0.0.1 all the same).
    pub async fn start_on(
        dir: &Path,
        address: &str,
        configure: impl FnOnce(AgentBuilder) -> AgentBuilder,
    ) -> Self {
        let builder = configure(
            Agent::builder(dir)
                .admin_token(Some(ADMIN.to_owned()))
                .workers(2)
                .default_grant(
                    Grant::default().with_timeout(std::time::Duration::from_millis(300)),
                ),
        );
        let (agent, _) = tokio::task::spawn_blocking(move || builder.build())
            .await
            .unwrap()
            .unwrap();
        let agent = Arc::new(agent);
        let listener = tokio::net::TcpListener::bind(address).await.unwrap();
        let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(deadlift_server::serve(agent.clone(), listener, async {
            let _ = stopped.await;
        }));
        Self {
            url,
            agent,
            http: reqwest::Client::new(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the server and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
        self.agent.shutdown().await;
    }

    /// A fresh token of `tenant` (created first if need be), made by the admin.
    pub async fn tenant_token(&self, tenant: &str) -> String {
        let created = self
            .http
            .post(self.url("/v1/tenants"))
            .bearer_auth(ADMIN)
            .json(&serde_json::json!({ "name": tenant }))
            .send()
            .await
            .unwrap();
        // Tenants `default` and `v1` exist from the start.
        let status = created.status().as_u16();
        assert!(status == 201 || status == 409, "{status}");
        let token: serde_json::Value = self
            .http
            .post(self.url(&format!("/v1/tenants/{tenant}/tokens")))
            .bearer_auth(ADMIN)
            .json(&serde_json::json!({ "description": "test" }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        token["token"].as_str().unwrap().to_owned()
    }

    /// `GET path` with `token`, as JSON.
    pub async fn get_json(&self, path: &str, token: &str) -> serde_json::Value {
        self.http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The text of `/metrics`.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// Asserts a JSON error answer with this status and code.
    pub async fn expect_error(response: reqwest::Response, status: u16, code: &str) -> String {
        assert_eq!(response.status().as_u16(), status, "status");
        let body: serde_json::Value = response.json().await.expect("a JSON error body");
        assert_eq!(body["error"]["code"], code, "{body}");
        let message = body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(!message.is_empty(), "{body}");
        message
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
