//! Plug-in KV shared by the cluster (`kv_get`, `kv_set`, `kv_delete` and the KV API): the
//! KV bucket `deadlift-kv`, key `<tenant>.k<hex of the plug-in's key>` (any key fits,
//! and a byte prefix of a key is a prefix of its hex). Every call reads and writes the
//! bucket, so a count kept by a plug-in is one count whichever agent runs it; as on one
//! agent, concurrent read-modify-writes are last-writer-wins.
//!
//! The engine calls `KvStore` from its worker threads, which run no Tokio runtime: each
//! operation runs on the agent's runtime and is waited for there ([`KV_WAIT`] at most).
//! At its first join, the agent's own entries go to the bucket where it has none under
//! their keys (once: a key in `deadlift-cluster` says so); its SQLite `kv` table is left
//! as it was (used again if it runs alone again).

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use deadlift_engine::host::{KvError, KvStore};

use super::ClusterError;
use crate::store::Database;

/// The bucket of plug-in KV.
pub const KV_BUCKET: &str = "deadlift-kv";
/// How long one KV operation may wait for the cluster.
const KV_WAIT: Duration = Duration::from_secs(5);

/// Plug-in KV in the cluster's bucket.
#[derive(Debug)]
pub(super) struct PluginKv {
    store: kv::Store,
    stream: stream::Stream,
    runtime: tokio::runtime::Handle,
}

impl PluginKv {
    /// Opens (or makes) the bucket and, at this member's first join, brings this agent's
    /// entries it lacks (`agreed`: the `deadlift-cluster` bucket, which remembers).
    pub(super) async fn start(
        jetstream: &jetstream::Context,
        replicas: usize,
        db: &Database,
        agreed: &kv::Store,
        member: &str,
    ) -> Result<Self, ClusterError> {
        let setup = |e: &dyn std::fmt::Display| ClusterError::Setup(e.to_string());
        let store = jetstream
            .create_key_value(kv::Config {
                bucket: KV_BUCKET.into(),
                history: 1,
                num_replicas: replicas.max(1),
                storage: stream::StorageType::File,
                ..kv::Config::default()
            })
            .await
            .map_err(|e| setup(&e))?;
        let stream = jetstream
            .get_stream(format!("KV_{KV_BUCKET}"))
            .await
            .map_err(|e| setup(&e))?;
        let brought = format!("kv-brought.{member}");
        if agreed
            .get(brought.as_str())
            .await
            .map_err(|e| setup(&e))?
            .is_none()
        {
            let local = db.clone();
            let entries = tokio::task::spawn_blocking(move || local.kv_entries())
                .await
                .map_err(|e| setup(&e))?
                .map_err(|e| setup(&e))?;
            for (tenant, key, value) in entries {
                match store.create(key_of(&tenant, &key), value.into()).await {
                    Ok(_) => {}
                    Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {}
                    Err(error) => return Err(setup(&error)),
                }
            }
            agreed
                .put(brought, bytes::Bytes::new())
                .await
                .map_err(|e| setup(&e))?;
        }
        Ok(Self {
            store,
            stream,
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// Runs one operation on the agent's runtime and waits for it on this thread (a
    /// worker or blocking thread: never a task of the runtime).
    fn wait<T: Send + 'static, E: std::fmt::Display>(
        &self,
        operation: impl std::future::Future<Output = Result<T, E>> + Send + 'static,
    ) -> Result<T, KvError> {
        let (answer, answered) = std::sync::mpsc::sync_channel(1);
        self.runtime.spawn(async move {
            let _ = answer.send(operation.await.map_err(|e| e.to_string()));
        });
        match answered.recv_timeout(KV_WAIT) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(KvError::Storage(format!("the cluster's KV: {error}"))),
            Err(_) => Err(KvError::Storage(format!(
                "the cluster's KV did not answer within {} s",
                KV_WAIT.as_secs()
            ))),
        }
    }
}

/// A tenant's keys starting with `prefix`: the newest message of each key's subject,
/// deletions left out.
async fn list(stream: &stream::Stream, tenant: &str, prefix: &str) -> Result<Vec<String>, String> {
    let subjects = format!("$KV.{KV_BUCKET}.{tenant}.k{}", hex::encode(prefix));
    let messages = super::read_now(
        stream,
        format!("$KV.{KV_BUCKET}.{tenant}.>"),
        consumer::DeliverPolicy::LastPerSubject,
        true,
        usize::MAX,
    )
    .await?;
    let mut keys = Vec::new();
    for message in messages {
        let deleted = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get("KV-Operation"))
            .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
        if deleted || !message.subject.starts_with(subjects.as_str()) {
            continue;
        }
        let hex_key = message
            .subject
            .rsplit('.')
            .next()
            .and_then(|token| token.strip_prefix('k'))
            .unwrap_or_default();
        if let Some(key) = hex::decode(hex_key)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
        {
            keys.push(key);
        }
    }
    keys.sort();
    Ok(keys)
}

fn key_of(tenant: &str, key: &str) -> String {
    format!("{tenant}.k{}", hex::encode(key))
}

impl KvStore for PluginKv {
    fn get(&self, tenant: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let (store, key) = (self.store.clone(), key_of(tenant, key));
        let value = self.wait(async move { store.get(key).await })?;
        Ok(value.map(|bytes| bytes.to_vec()))
    }

    fn set(&self, tenant: &str, key: &str, value: &[u8]) -> Result<(), KvError> {
        let (store, key) = (self.store.clone(), key_of(tenant, key));
        let value = bytes::Bytes::copy_from_slice(value);
        self.wait(async move { store.put(key, value).await })?;
        Ok(())
    }

    fn delete(&self, tenant: &str, key: &str) -> Result<bool, KvError> {
        let (store, key) = (self.store.clone(), key_of(tenant, key));
        self.wait(async move {
            if store
                .get(key.clone())
                .await
                .map_err(|e| e.to_string())?
                .is_none()
            {
                return Ok::<_, String>(false);
            }
            store.delete(key).await.map_err(|e| e.to_string())?;
            Ok(true)
        })
    }

    fn keys(&self, tenant: &str, prefix: &str) -> Result<Vec<String>, KvError> {
        let (stream, tenant, prefix) = (self.stream.clone(), tenant.to_owned(), prefix.to_owned());
        self.wait(async move { list(&stream, &tenant, &prefix).await })
    }
}
