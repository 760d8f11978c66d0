//! The topics triage writes (dead letters, escalations): created by `triage topics apply` when
//! missing (idempotent), waited for by `triage topics wait` (a worker's init container). The
//! topics a route consumes belong to their producers and are never created here.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

use super::config::{ClientRole, KafkaConfig};
use super::{check_topics_exist, CheckTopicsError};

#[derive(Debug, thiserror::Error)]
pub enum TopicsError {
    #[error("creating Kafka topic `{topic}`: {cause}")]
    Create { topic: String, cause: String },
    #[error(transparent)]
    Check(#[from] CheckTopicsError),
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// A topic triage writes: name, partitions, replication factor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideTopic {
    pub name: String,
    pub partitions: i32,
    pub replication: i32,
}

/// The side topics for a configuration (the escalation topic only when escalation is on).
pub fn side_topics(kafka: &KafkaConfig, escalation_enabled: bool) -> Vec<SideTopic> {
    let topic = |name: &str| SideTopic {
        name: name.to_string(),
        partitions: kafka.side_topic_partitions,
        replication: kafka.side_topic_replication,
    };
    let mut out = vec![topic(&kafka.dead_letter_topic)];
    if escalation_enabled {
        out.push(topic(&kafka.escalation_topic));
    }
    out
}

/// What `apply` did to one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Existed,
    Created,
}

/// Create the side topics that do not exist; a topic created meanwhile by someone else counts
/// as existing. Retries while the cluster is not reachable, up to `wait`.
pub async fn apply(kafka: &KafkaConfig, topics: &[SideTopic], wait: Duration) -> Result<Vec<(String, Applied)>, TopicsError> {
    let names: Vec<String> = topics.iter().map(|t| t.name.clone()).collect();
    let missing = wait_for_answer(kafka, &names, wait).await?;
    let admin: AdminClient<DefaultClientContext> = kafka.client(ClientRole::Observer).create()?;
    let mut out = Vec::new();
    for topic in topics {
        if !missing.contains(&topic.name) {
            out.push((topic.name.clone(), Applied::Existed));
            continue;
        }
        let new = NewTopic::new(&topic.name, topic.partitions, TopicReplication::Fixed(topic.replication));
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))).request_timeout(Some(Duration::from_secs(30)));
        let results = admin.create_topics([&new], &options).await.map_err(|e| TopicsError::Create {
            topic: topic.name.clone(),
            cause: format!("{e} (may this user create topics? else create it by hand: kafka-topics.sh --create --topic {} --partitions {} --replication-factor {})", topic.name, topic.partitions, topic.replication),
        })?;
        match results.into_iter().next() {
            Some(Ok(_)) => out.push((topic.name.clone(), Applied::Created)),
            Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => out.push((topic.name.clone(), Applied::Existed)),
            Some(Err((_, code))) => return Err(TopicsError::Create { topic: topic.name.clone(), cause: code.to_string() }),
            None => return Err(TopicsError::Create { topic: topic.name.clone(), cause: "no answer".into() }),
        }
    }
    Ok(out)
}

/// Which of `names` are missing, once the cluster answers (retried up to `wait`).
async fn wait_for_answer(kafka: &KafkaConfig, names: &[String], wait: Duration) -> Result<Vec<String>, TopicsError> {
    let deadline = Instant::now() + wait;
    loop {
        let (kafka, names_owned) = (kafka.clone(), names.to_vec());
        let result = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = names_owned.iter().map(String::as_str).collect();
            check_topics_exist(&kafka, &refs, Duration::from_secs(10))
        })
        .await
        .map_err(|e| TopicsError::Create { topic: names.join(", "), cause: e.to_string() })?;
        match result {
            Ok(()) => return Ok(Vec::new()),
            Err(CheckTopicsError::Missing(m)) => return Ok(m.missing),
            Err(e) if Instant::now() >= deadline => return Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, "Kafka not reachable yet");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

/// Wait until every one of `names` exists (the topics Job may still be running), up to `wait`.
pub async fn wait_until_exist(kafka: &KafkaConfig, names: &[String], wait: Duration) -> Result<(), TopicsError> {
    let deadline = Instant::now() + wait;
    loop {
        let missing = wait_for_answer(kafka, names, deadline.saturating_duration_since(Instant::now())).await?;
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(CheckTopicsError::Missing(super::MissingTopics { missing }).into());
        }
        tracing::info!(missing = ?missing, "waiting for the side topics");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_side_topics_follow_the_config() {
        let k = KafkaConfig { side_topic_partitions: 6, side_topic_replication: 2, ..KafkaConfig::default() };
        let both = side_topics(&k, true);
        assert_eq!(
            both,
            vec![
                SideTopic { name: "triage.dead-letter".into(), partitions: 6, replication: 2 },
                SideTopic { name: "triage.escalations".into(), partitions: 6, replication: 2 },
            ]
        );
        assert_eq!(side_topics(&k, false).len(), 1, "no escalation topic when escalation is off");
    }
}
