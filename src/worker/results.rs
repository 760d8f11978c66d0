//! Outcomes of the engines -> settlements: a failed message is dead-lettered; a classified one
//! becomes a row for the ClickHouse sink and, when its route's policy doubts it, also an
//! escalation record. Runs as one task; the row channel is bounded, so a slow ClickHouse slows
//! this loop, the engines, and finally the consumer (which pauses).

use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::policy::{decide, EscalationPolicy};
#[cfg(test)]
use super::routes::TierModel;
use super::routes::{MessageTag, Route, Tier};
use crate::engine::{Classified, ClassifyError, Outcome, Submitter};
use crate::model::HeadOutput;
use crate::settle::Settler;
use crate::sink::clickhouse::{ResultRow, SinkItem};
use crate::sink::kafka::{cut_at_char, Fit};
use crate::source::Consumed;
use crate::telemetry::events::{CascadeForwarded, DeadLetterReason, EscalationReason, InternalEvent, MessageClassified, ShadowDropped};

pub(super) struct ResultsLoop {
    pub routes: Arc<Vec<Route>>,
    pub rows: mpsc::Sender<SinkItem<Consumed>>,
    pub settle: Settler,
    pub worker_id: String,
    pub escalation_enabled: bool,
    /// The engines this one's doubtful results go on to (cascades), by engine index.
    pub next_tiers: Vec<(usize, Submitter<MessageTag>)>,
    /// Where shadow models' answers go (the shadow table's sink), when a route has a shadow.
    pub shadow_rows: Option<mpsc::Sender<SinkItem<()>>>,
}

impl ResultsLoop {
    /// Until the engine closes its outcome channel, or the sink stops (fatal). One loop runs
    /// per engine: a loop waiting for room in the next tier's queue holds up only its own
    /// engine, while the next tier's loop keeps draining (tiers only feed forward).
    pub async fn run(self, outcomes: flume::Receiver<Outcome<MessageTag>>) {
        while let Ok(outcome) = outcomes.recv_async().await {
            if outcome.tag.shadow {
                self.shadow_answer(outcome.tag, outcome.result);
                continue;
            }
            let mut tag = outcome.tag;
            let route = &self.routes[tag.route];
            let classified = match outcome.result {
                Ok(c) => c,
                Err(ClassifyError::Backend(detail)) => {
                    let model = tag.answering().model.name.clone();
                    self.settle.stop(super::WorkerError::Backend { model, detail });
                    continue;
                }
                // A later tier failed on a message an earlier one classified: keep that answer
                // (which was doubted, so it is escalated) rather than lose the message.
                Err(e) if !tag.earlier.is_empty() => {
                    let failed = &tag.answering().model.name;
                    tracing::warn!(model = %failed, tier = tag.tier, error = %e, "a cascade tier failed on a message: the previous tier's answer is kept");
                    tag.tier -= 1;
                    tag.versions.pop();
                    let Some(previous) = tag.earlier.pop() else { continue };
                    // It was passed on because that tier doubted it: escalate it for the reason given.
                    let doubt = decide(&previous.prediction, &tag.answering().policy).or(Some(EscalationReason::LowConfidence));
                    if self.store(tag, previous, doubt).await.is_err() {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    let reason = match &e {
                        ClassifyError::Input(d) => DeadLetterReason::Decode(d.reason),
                        ClassifyError::Tokenize(_) => DeadLetterReason::TokenizeFailed,
                        ClassifyError::Inference(_) | ClassifyError::Backend(_) => DeadLetterReason::InferenceFailed,
                    };
                    self.settle.dead_letter(tag.message, reason, e.to_string());
                    continue;
                }
            };
            let doubt = decide(&classified.prediction, &tag.answering().policy);
            let (tag, classified) = match (doubt, route.tiers.get(tag.tier + 1)) {
                (Some(_), Some(next)) => match self.forward(tag, classified, next).await {
                    Ok(()) | Err(None) => continue,
                    Err(Some(kept)) => kept,
                },
                _ => (tag, classified),
            };
            if self.store(tag, classified, doubt).await.is_err() {
                return;
            }
        }
    }

    /// A shadow model's answer: a row for the shadow table if its writer has room, never an
    /// escalation, a dead letter or a settlement (the primary's answer settles the message).
    /// `escalated` says what the shadow WOULD have escalated, by its own calibration.
    fn shadow_answer(&self, tag: MessageTag, result: Result<Classified, ClassifyError>) {
        let route = &self.routes[tag.route];
        let kind = &route.config.kind;
        let classified = match result {
            Ok(classified) => classified,
            Err(e) => {
                tracing::debug!(model = %tag.answering().model.name, error = %e, "the shadow model failed on a message");
                return ShadowDropped { kind, reason: "failed" }.emit(self.settle.counters());
            }
        };
        let would_escalate = decide(&classified.prediction, &tag.answering().policy).is_some();
        let row = build_row(&tag, &classified, route, would_escalate, &self.worker_id);
        let sent = self.shadow_rows.as_ref().is_some_and(|rows| rows.try_send(SinkItem { row, ticket: () }).is_ok());
        if !sent {
            ShadowDropped { kind, reason: "sink_behind" }.emit(self.settle.counters());
        }
    }

    /// Send a doubted message on to the next tier. Err(Some): it cannot go (its payload does
    /// not decode for that model), store this tier's answer; Err(None): the next engine has
    /// stopped (shutdown), the message stays unfinished and is replayed.
    async fn forward(&self, mut tag: MessageTag, classified: Classified, next: &Tier) -> Result<(), Option<(MessageTag, Classified)>> {
        let next_model = next.current();
        let decoded = match &tag.record {
            Some(record) => next_model.decoder.decode_value((**record).clone()),
            None => next_model.decoder.decode(&tag.message.message.payload),
        };
        let text = match decoded {
            Ok(decoded) => decoded.text,
            Err(e) => {
                tracing::warn!(model = %next_model.model.name, error = %e.detail, "the next cascade tier cannot read this message: this tier's answer is kept");
                return Err(Some((tag, classified)));
            }
        };
        let Some((_, submitter)) = self.next_tiers.iter().find(|(engine, _)| *engine == next.engine) else {
            return Err(Some((tag, classified)));
        };
        let route = &self.routes[tag.route];
        let from = &tag.answering().model.name;
        CascadeForwarded { kind: &route.config.kind, from, to: &next_model.model.name }.emit(self.settle.counters());
        tag.earlier.push(classified);
        tag.tier += 1;
        tag.versions.push(next_model.clone());
        let submitted = match &next_model.generation {
            Some(generation) => submitter.submit_async_to(generation, tag, text).await,
            None => submitter.submit_async(tag, text).await,
        };
        match submitted {
            Ok(()) => Ok(()),
            Err(closed) => {
                tracing::warn!(offset = closed.0.message.message.offset, "the next cascade tier stopped; the message will be replayed");
                Err(None)
            }
        }
    }

    /// The answer of the tier that has the last word: escalated when `doubt` (its tier's
    /// verdict, decided by the caller) says so, and written as the message's row.
    async fn store(&self, tag: MessageTag, classified: Classified, doubt: Option<EscalationReason>) -> Result<(), SinkStopped> {
        let route = &self.routes[tag.route];
        let doubt = doubt.filter(|_| self.escalation_enabled);
        let row = build_row(&tag, &classified, route, doubt.is_some(), &self.worker_id);
        if let Some(reason) = doubt {
            let record = escalation_record(&tag, &classified, route, reason, &row);
            self.settle.escalate(&tag.message, tag.message_id.clone(), record, route.config.kind.clone(), reason);
        }
        let answering = &tag.answering().model;
        MessageClassified { kind: &route.config.kind, model: &answering.name, version: &answering.version }.emit(self.settle.counters());
        // The sink stopped (fatal): nothing more can be stored.
        self.rows.send(SinkItem { row, ticket: tag.message }).await.map_err(|_| SinkStopped)
    }
}

struct SinkStopped;

/// The shadow table's rows settle nothing: stored or not, the message's own row decides.
pub(super) struct ShadowRows;

impl crate::sink::clickhouse::Settle<()> for ShadowRows {
    fn stored(&self, _ticket: (), _row: &ResultRow) {}

    fn rejected(&self, _ticket: (), error: &str) {
        tracing::warn!(error, "ClickHouse refused a shadow row");
    }
}

fn build_row(tag: &MessageTag, c: &Classified, route: &Route, escalated: bool, worker_id: &str) -> ResultRow {
    let p = &c.prediction;
    let tier = tag.answering();
    let (mut head_names, mut head_labels, mut head_scores) = (Vec::new(), Vec::new(), Vec::new());
    for h in &p.heads {
        if let HeadOutput::Label(l) = &h.output {
            head_names.push(h.head.clone());
            head_labels.push(l.label.clone());
            head_scores.push(l.score);
        }
    }
    let source = &tag.message.message;
    let (topic, partition, offset, _) = source.key_source();
    let first = tag.earlier.first().map_or(p, |c| &c.prediction);
    ResultRow {
        topic: topic.to_string(),
        partition: partition.max(0) as u32,
        offset: offset.max(0) as u64,
        message_id: tag.message_id.clone(),
        kind: route.config.kind.clone(),
        event_time: (tag.event_time_ms.max(0) / 1000).min(u32::MAX as i64) as u32,
        event_time_ms: tag.event_time_ms.max(0) as u64,
        consumed_time_ms: tag.consumed_ms,
        processed_time_ms: 0,
        model_name: tier.model.name.clone(),
        model_version: tier.model.version.clone(),
        category: p.category.as_ref().map(|c| c.label.clone()).unwrap_or_default(),
        confidence: p.category.as_ref().map(|c| c.score).unwrap_or(0.0),
        priority: p.priority.clone().unwrap_or_default(),
        tags: p.tags.iter().map(|t| t.label.clone()).collect(),
        tag_scores: p.tags.iter().map(|t| t.score).collect(),
        head_names,
        head_labels,
        head_scores,
        escalated: u8::from(escalated),
        text_chars: c.chars as u32,
        tokens: c.tokens as u32,
        truncated: u8::from(c.truncated),
        metadata_keys: tag.metadata.0.clone(),
        metadata_values: tag.metadata.1.clone(),
        worker_id: worker_id.to_string(),
        ood_score: p.ood_score,
        redriven: u8::from(source.origin.is_some()),
        tier: tag.tier.min(u8::MAX as usize) as u8,
        first_model_name: tag.versions.first().map(|t| t.model.name.clone()).unwrap_or_default(),
        first_category: first.category.as_ref().map(|c| c.label.clone()).unwrap_or_default(),
        first_confidence: first.category.as_ref().map(|c| c.score).unwrap_or(0.0),
        answered_by: format!("model:{}", tier.model.name),
        ..ResultRow::default()
    }
}

/// An escalation record: JSON with everything the next tier needs (the row included). When it is too large for
/// the topic, the original message becomes its text cut at a character boundary, and
/// `"message_truncated": true` says so; the record stays valid JSON.
pub(super) struct EscalationRecord {
    value: Value,
    bytes: Vec<u8>,
}

impl EscalationRecord {
    fn new(value: Value) -> Self {
        let bytes = serde_json::to_vec(&value).unwrap_or_default();
        EscalationRecord { value, bytes }
    }

    #[cfg(test)]
    fn value(&self) -> &Value {
        &self.value
    }
}

impl Fit for EscalationRecord {
    fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn cut(&self, limit: usize) -> Option<Vec<u8>> {
        let text = match &self.value["message"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let mut value = self.value.clone();
        value["message_truncated"] = Value::Bool(true);
        value["message"] = Value::String(String::new());
        let frame = serde_json::to_vec(&value).ok()?.len();
        // Escaping can make the text longer in JSON than in memory: shrink until it fits.
        let mut budget = limit.checked_sub(frame)?;
        loop {
            value["message"] = Value::String(cut_at_char(&text, budget).to_string());
            let bytes = serde_json::to_vec(&value).ok()?;
            if bytes.len() <= limit {
                return Some(bytes);
            }
            let over = bytes.len() - limit;
            budget = budget.checked_sub(over.max(budget / 8).max(1))?;
        }
    }
}

/// `row`: the message's row as stored, which `triage escalate` writes again with the LLM's
/// answer (same key, same event time, a higher-ranked version).
fn escalation_record(tag: &MessageTag, c: &Classified, route: &Route, reason: EscalationReason, row: &ResultRow) -> EscalationRecord {
    let source = &tag.message.message;
    let key = source.key_source();
    // The record as JSON (an Avro / Protobuf one as it was read), for the LLM tier and people.
    let original: Value = match &tag.record {
        Some(record) => (**record).clone(),
        None => {
            serde_json::from_slice(&source.payload).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&source.payload).into_owned()))
        }
    };
    let p = &c.prediction;
    let tier = tag.answering();
    let policy: &EscalationPolicy = &tier.policy;
    let heads: serde_json::Map<String, Value> = p
        .heads
        .iter()
        .filter_map(|h| match &h.output {
            HeadOutput::Label(l) => Some((h.head.clone(), json!({"label": l.label, "score": l.score}))),
            HeadOutput::Tags(t) => Some((h.head.clone(), json!(t))),
            HeadOutput::Embedding(_) => None,
        })
        .collect();
    EscalationRecord::new(json!({
        "message_id": tag.message_id,
        "kind": route.config.kind,
        "source": {"topic": key.0, "partition": key.1, "offset": key.2, "timestamp_ms": key.3, "redriven": source.origin.is_some()},
        "reason": {
            "why": reason.as_str(),
            "head": policy.head.clone().unwrap_or_else(|| "category".into()),
            "confidence": policy.confidence(p).unwrap_or(0.0),
            "threshold": policy.threshold,
            "ood_score": p.ood_score,
            "ood_threshold": policy.ood_threshold,
        },
        "result": {
            "category": p.category.as_ref().map(|c| &c.label),
            "confidence": p.category.as_ref().map(|c| c.score),
            "priority": p.priority,
            "tags": p.tags.iter().map(|t| &t.label).collect::<Vec<_>>(),
            "heads": heads,
            "model": tier.model.name,
            "model_version": tier.model.version,
            "tier": tag.tier,
        },
        "earlier_tiers": tag.earlier.iter().enumerate().map(|(i, e)| json!({
            "model": tag.versions.get(i).map(|t| t.model.name.as_str()),
            "category": e.prediction.category.as_ref().map(|c| &c.label),
            "confidence": e.prediction.category.as_ref().map(|c| c.score),
        })).collect::<Vec<_>>(),
        "row": row,
        "message": original,
    }))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::message::{Decoder, FieldMap};
    use crate::model::{HeadResult, LabelScore, ModelInfo, Prediction, Provider, Template};
    use crate::source::{Delivery, SourceMessage, TopicPartition};

    fn tier(name: &str, version: &str, engine: usize, policy: EscalationPolicy) -> Tier {
        Tier::new(engine, tier_model(name, version, policy))
    }

    fn tier_model(name: &str, version: &str, policy: EscalationPolicy) -> TierModel {
        TierModel {
            generation: None,
            decoder: Decoder::new(FieldMap::default(), Template::parse("{body}").unwrap(), 1 << 20, 2048),
            model: ModelInfo {
                name: name.into(),
                version: version.into(),
                fingerprint: "abc".into(),
                dir: name.into(),
                max_length: 128,
                provider: Provider::Cpu,
            },
            policy,
        }
    }

    fn route(policy: EscalationPolicy) -> Route {
        Route {
            config: toml::from_str("topic = \"tickets\"\nkind = \"ticket\"\nmodel = \"m\"").unwrap(),
            reader: Arc::new(crate::source::decode::RecordReader::json(1 << 20)),
            tiers: vec![tier("support", "v7", 0, policy)],
            shadow: None,
            canary: None,
        }
    }

    /// A message the route's first tier is classifying.
    fn tag(route: &Route, payload: &[u8]) -> MessageTag {
        let message = Arc::new(SourceMessage {
            topic: "tickets".into(),
            partition: 2,
            offset: 41,
            timestamp_ms: Some(1_700_000_000_000),
            key: None,
            payload: payload.to_vec(),
            origin: None,
        });
        MessageTag {
            message: Consumed { delivery: Delivery { tp: TopicPartition::new("tickets", 2), offset: 41, epoch: 1 }, message },
            route: 0,
            message_id: "t-1".into(),
            event_time_ms: 1_700_000_123_456,
            consumed_ms: 1_700_000_200_000,
            metadata: (vec!["customer".into()], vec!["acme".into()]),
            tier: 0,
            earlier: Vec::new(),
            versions: vec![route.first().current()],
            shadow: false,
            record: None,
        }
    }

    fn classified() -> Classified {
        let label = |l: &str, score| LabelScore { label: l.into(), score };
        Classified {
            prediction: Prediction {
                category: Some(label("card_lost", 0.42)),
                priority: Some("high".into()),
                tags: vec![label("urgent", 0.9)],
                heads: vec![
                    HeadResult { head: "intent".into(), output: HeadOutput::Label(label("card_lost", 0.42)) },
                    HeadResult { head: "tags".into(), output: HeadOutput::Tags(vec![label("urgent", 0.9)]) },
                    HeadResult { head: "embedding".into(), output: HeadOutput::Embedding(vec![0.1, 0.2]) },
                ],
                ood_score: Some(0.12),
            },
            tokens: 17,
            truncated: true,
            chars: 64,
            queued: Duration::ZERO,
            inference: Duration::ZERO,
            batch_size: 4,
        }
    }

    #[test]
    fn a_row_carries_the_source_key_event_time_and_every_label_head() {
        let route = route(EscalationPolicy { head: None, threshold: 0.5, ood_threshold: None });
        let row = build_row(&tag(&route, b"{}"), &classified(), &route, true, "pod-3");
        assert_eq!((row.topic.as_str(), row.partition, row.offset), ("tickets", 2, 41));
        assert_eq!(row.kind, "ticket", "the route's kind: what analysts filter on");
        assert_eq!(row.consumed_time_ms, 1_700_000_200_000);
        assert_eq!((row.confidence, row.tag_scores.clone()), (0.42, vec![0.9]));
        assert_eq!((row.head_labels.clone(), row.head_scores.clone()), (vec!["card_lost".to_string()], vec![0.42]));
        assert_eq!((row.metadata_keys.clone(), row.redriven), (vec!["customer".to_string()], 0));
        assert_eq!((row.event_time, row.event_time_ms), (1_700_000_123, 1_700_000_123_456));
        assert_eq!((row.category.as_str(), row.priority.as_str(), row.escalated), ("card_lost", "high", 1));
        assert_eq!(row.head_names, vec!["intent"], "label heads only: tags and embeddings have their own columns or none");
        assert_eq!(row.tags, vec!["urgent"]);
        assert_eq!((row.model_name.as_str(), row.model_version.as_str(), row.worker_id.as_str()), ("support", "v7", "pod-3"));
        assert_eq!((row.tokens, row.truncated, row.text_chars), (17, 1, 64));
        assert_eq!(row.metadata_values, vec!["acme"]);
        assert_eq!(row.ood_score, Some(0.12));
    }

    #[test]
    fn a_later_tier_row_names_its_own_model_and_keeps_the_first_answer() {
        let policy = EscalationPolicy { head: None, threshold: 0.5, ood_threshold: None };
        let mut route = route(policy.clone());
        route.tiers.push(tier("accurate", "v2", 1, policy));
        let only = build_row(&tag(&route, b"{}"), &classified(), &route, false, "pod-3");
        assert_eq!((only.tier, only.first_category.as_str(), only.first_model_name.as_str()), (0, "card_lost", "support"));
        assert!((only.first_confidence - 0.42).abs() < 1e-6, "one tier: its answer is the first answer");
        let mut second = classified();
        second.prediction.category = Some(LabelScore { label: "card_stolen".into(), score: 0.91 });
        let mut tag = tag(&route, b"{}");
        tag.tier = 1;
        tag.earlier.push(classified());
        tag.versions.push(route.tiers[1].current());
        let row = build_row(&tag, &second, &route, false, "pod-3");
        assert_eq!((row.tier, row.model_name.as_str(), row.model_version.as_str()), (1, "accurate", "v2"));
        assert_eq!(
            (row.category.as_str(), row.first_category.as_str(), row.first_model_name.as_str()),
            ("card_stolen", "card_lost", "support")
        );
        assert!((row.first_confidence - 0.42).abs() < 1e-6);
        let record = escalation_record(&tag, &second, &route, EscalationReason::LowConfidence, &row);
        let v: Value = serde_json::from_slice(record.bytes()).unwrap();
        assert_eq!((v["result"]["model"].as_str(), v["result"]["tier"].as_u64()), (Some("accurate"), Some(1)));
        let carried: ResultRow = serde_json::from_value(v["row"].clone()).unwrap();
        assert_eq!(carried, row, "the record carries the whole row, for the LLM tier to write again");
        assert_eq!(carried.answered_by, "model:accurate");
        assert_eq!(v["earlier_tiers"][0]["model"], "support");
        assert_eq!(v["earlier_tiers"][0]["category"], "card_lost");
    }

    #[test]
    fn an_escalation_record_says_why_and_keeps_the_original_message() {
        let route = route(EscalationPolicy { head: None, threshold: 0.5, ood_threshold: Some(0.3) });
        let record = escalation_record(
            &tag(&route, br#"{"body": "my card is gone"}"#),
            &classified(),
            &route,
            EscalationReason::LowConfidence,
            &ResultRow::default(),
        );
        let v: Value = serde_json::from_slice(record.bytes()).unwrap();
        assert_eq!(v["message_id"], record.value()["message_id"], "the bytes are the value");
        assert_eq!(v["message_id"], "t-1");
        assert_eq!(v["reason"]["why"], "low_confidence");
        assert_eq!(v["reason"]["head"], "category");
        assert!((v["reason"]["confidence"].as_f64().unwrap() - 0.42).abs() < 1e-6);
        assert!((v["reason"]["ood_threshold"].as_f64().unwrap() - 0.3).abs() < 1e-6);
        assert_eq!(v["source"]["offset"], 41);
        assert_eq!(v["message"]["body"], "my card is gone");
        assert_eq!(v["result"]["heads"]["tags"][0]["label"], "urgent");
        assert!(v["result"]["heads"].get("embedding").is_none(), "vectors stay out of escalations");
        let record = escalation_record(
            &tag(&route, b"\xff not json"),
            &classified(),
            &route,
            EscalationReason::OutOfDistribution,
            &ResultRow::default(),
        );
        let v: Value = serde_json::from_slice(record.bytes()).unwrap();
        assert!(v["message"].is_string(), "a payload that is not JSON travels as text");
        assert_eq!(v["reason"]["why"], "out_of_distribution");
    }

    #[test]
    fn a_record_too_large_is_cut_into_valid_json_that_says_so() {
        let route = route(EscalationPolicy { head: None, threshold: 0.5, ood_threshold: None });
        // Multi-byte characters and characters JSON must escape, so cuts land mid-character.
        let body = "é\"\n\u{1}€".repeat(40_000);
        let payload = serde_json::to_vec(&json!({ "body": body })).unwrap();
        let record =
            escalation_record(&tag(&route, &payload), &classified(), &route, EscalationReason::LowConfidence, &ResultRow::default());
        assert!(record.bytes().len() > 200_000);
        for limit in [100_000, 4_096, 2_000] {
            let cut = record.cut(limit).unwrap_or_else(|| panic!("no cut to {limit}"));
            assert!(cut.len() <= limit, "{} > {limit}", cut.len());
            let v: Value = serde_json::from_slice(&cut).unwrap();
            assert_eq!(v["message_truncated"], true);
            assert_eq!(v["message_id"], "t-1", "everything but the message text is kept");
            assert_eq!(v["reason"]["why"], "low_confidence");
            let text = v["message"].as_str().unwrap();
            assert!(String::from_utf8_lossy(&payload).starts_with(text), "the text is a prefix of the original");
            assert!(limit < 4_096 || text.len() > limit / 4, "the cut keeps a useful share: {} of {limit}", text.len());
        }
        assert!(record.cut(10).is_none(), "a limit smaller than the record's frame cannot be met");
    }
}
