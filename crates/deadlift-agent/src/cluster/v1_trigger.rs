//! The original Deadlift's NATS trigger: a message published on a NATS core subject
//! equal to a v1 workflow's first module's subject becomes a `v1` event of that type,
//! stored in the cluster's stream (in a queue group, so one agent takes it), which starts
//! the workflow at its second module.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::task::JoinHandle;

use super::Cluster;
use crate::V1_TENANT;
use crate::workflow::CloudEvent;

/// The queue group of the v1 trigger's subscriptions.
const V1_QUEUE: &str = "deadlift-v1";
/// How often the v1 trigger looks for new v1 workflows.
const V1_RESCAN: Duration = Duration::from_secs(1);

/// Subscribes, in a queue group, to the subject of each v1 workflow's first module and
/// turns each message into a `v1` event of that type, stored in the cluster's stream.
pub(super) async fn run(
    client: async_nats::Client,
    cluster: std::sync::Weak<Cluster>,
    triggers: crate::workflow::V1Triggers,
) {
    let mut subscribed: BTreeMap<String, JoinHandle<()>> = BTreeMap::new();
    loop {
        let wanted: BTreeSet<String> = match triggers.subjects().await {
            Ok(subjects) => subjects,
            Err(error) => {
                tracing::warn!("cannot read the v1 workflows: {error}");
                BTreeSet::new()
            }
        };
        subscribed.retain(|subject, task| {
            let keep = wanted.contains(subject);
            if !keep {
                task.abort();
            }
            keep
        });
        for subject in wanted {
            if subscribed.contains_key(&subject) {
                continue;
            }
            match client
                .queue_subscribe(subject.clone(), V1_QUEUE.into())
                .await
            {
                Ok(subscriber) => {
                    let task = tokio::spawn(forward_v1(subscriber, cluster.clone()));
                    subscribed.insert(subject, task);
                }
                Err(error) => {
                    tracing::warn!(%subject, "cannot subscribe for the v1 trigger: {error}")
                }
            }
        }
        tokio::time::sleep(V1_RESCAN).await;
    }
}

/// Each message on a v1 trigger subject, as a `v1` event: its data the message's JSON
/// (or its text), its id the message's `Nats-Msg-Id` when it has one.
async fn forward_v1(mut subscriber: async_nats::Subscriber, cluster: std::sync::Weak<Cluster>) {
    while let Some(message) = subscriber.next().await {
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        let data = serde_json::from_slice::<Value>(&message.payload).unwrap_or_else(|_| {
            Value::String(String::from_utf8_lossy(&message.payload).into_owned())
        });
        let mut event = CloudEvent::new(
            message.subject.to_string(),
            format!("nats://{}", message.subject),
            data,
        );
        if let Some(id) = message
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|id| id.as_str().to_owned())
            .filter(|id| !id.is_empty() && id.len() <= 256)
        {
            event.id = id;
        }
        if let Err(error) = event.validate() {
            tracing::warn!(subject = %message.subject, "a v1 trigger message is not an event: {error}");
            continue;
        }
        if let Err(error) = cluster.publish(V1_TENANT, vec![event]).await {
            tracing::warn!(subject = %message.subject, "a v1 trigger message was not stored: {error}");
        }
    }
}
