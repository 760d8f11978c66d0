//! Whether a classified message is escalated: every threshold rule in one place, pure.
//!
//! The confidence threshold of a route is its own `escalation_threshold`, else the one its model
//! was calibrated for (only when the route decides on the category head, which is what the
//! calibration measured), else `[escalation] default_threshold`. The out-of-distribution gate is
//! the route's `ood_threshold`, else the model's calibrated `[ood] threshold`; a model without
//! an OOD layer never escalates on it.

use crate::config::RouteConfig;
use crate::model::{Descriptor, Prediction};
use crate::telemetry::events::EscalationReason;

/// A route's resolved escalation rule.
#[derive(Debug, Clone, PartialEq)]
pub struct EscalationPolicy {
    /// The single-label head whose confidence decides (None: the category head).
    pub head: Option<String>,
    /// Escalate when that confidence is below this.
    pub threshold: f32,
    /// Escalate when the message's OOD score is above this.
    pub ood_threshold: Option<f32>,
}

impl EscalationPolicy {
    /// Resolve a route's rule against its model's descriptor. `model_has_ood`: the loaded model
    /// computes an OOD score.
    pub fn resolve(route: &RouteConfig, model: &Descriptor, model_has_ood: bool, default_threshold: f32) -> Self {
        let calibrated = model.escalation.as_ref().map(|e| e.threshold).filter(|_| route.escalation_head.is_none());
        EscalationPolicy {
            head: route.escalation_head.clone(),
            threshold: route.escalation_threshold.or(calibrated).unwrap_or(default_threshold),
            ood_threshold: route.ood_threshold.or(model.ood.as_ref().map(|o| o.threshold)).filter(|_| model_has_ood),
        }
    }

    /// A model's own rule, as an intermediate cascade tier uses it: its calibrated threshold
    /// (else `default_threshold`) on the category head, and its OOD gate.
    pub fn of_model(model: &Descriptor, model_has_ood: bool, default_threshold: f32) -> Self {
        EscalationPolicy {
            head: None,
            threshold: model.escalation.as_ref().map_or(default_threshold, |e| e.threshold),
            ood_threshold: model.ood.as_ref().map(|o| o.threshold).filter(|_| model_has_ood),
        }
    }

    /// The deciding head's confidence for this prediction.
    pub fn confidence(&self, prediction: &Prediction) -> Option<f32> {
        prediction.confidence(self.head.as_deref())
    }
}

/// Why `prediction` must be escalated under `policy`, if it must. Being unlike the training
/// data says more than a low score does, so it is the reason given when both hold.
pub fn decide(prediction: &Prediction, policy: &EscalationPolicy) -> Option<EscalationReason> {
    if prediction.ood_score.zip(policy.ood_threshold).is_some_and(|(score, limit)| score > limit) {
        Some(EscalationReason::OutOfDistribution)
    } else if policy.confidence(prediction).is_some_and(|c| c < policy.threshold) {
        Some(EscalationReason::LowConfidence)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::model::{HeadOutput, HeadResult, LabelScore};

    const HEADS: &str = "[[heads]]\nname = \"intent\"\noutput = \"p\"\nkind = \"single_label\"\nlabels = [\"a\", \"b\"]\n";

    fn route() -> RouteConfig {
        toml::from_str("topic = \"tickets\"\nkind = \"ticket\"\nmodel = \"m\"").unwrap()
    }

    fn descriptor(extra: &str) -> Descriptor {
        Descriptor::parse(&format!("{HEADS}{extra}"), Path::new("m")).unwrap()
    }

    fn prediction(category: f32, other_head: f32, ood: Option<f32>) -> Prediction {
        let label = |score| LabelScore { label: "a".into(), score };
        Prediction {
            category: Some(label(category)),
            priority: None,
            tags: Vec::new(),
            heads: vec![HeadResult { head: "other".into(), output: HeadOutput::Label(label(other_head)) }],
            ood_score: ood,
        }
    }

    #[test]
    fn thresholds_resolve_route_then_model_then_default() {
        let plain = descriptor("");
        let calibrated = descriptor("[escalation]\nthreshold = 0.7\n");
        assert_eq!(EscalationPolicy::resolve(&route(), &plain, false, 0.5).threshold, 0.5);
        assert_eq!(
            EscalationPolicy::resolve(&route(), &calibrated, false, 0.5).threshold,
            0.7,
            "the model's calibration beats the default"
        );
        let own = RouteConfig { escalation_threshold: Some(0.2), ..route() };
        assert_eq!(EscalationPolicy::resolve(&own, &calibrated, false, 0.5).threshold, 0.2, "a route's own threshold beats the model's");
        let other_head = RouteConfig { escalation_head: Some("other".into()), ..route() };
        assert_eq!(EscalationPolicy::resolve(&other_head, &calibrated, false, 0.5).threshold, 0.5, "calibrated for the category head only");
    }

    #[test]
    fn the_ood_gate_needs_a_model_that_scores_it() {
        let gated = descriptor("[ood]\noutput = \"embedding\"\nthreshold = 0.3\n");
        assert_eq!(EscalationPolicy::resolve(&route(), &gated, true, 0.5).ood_threshold, Some(0.3));
        assert_eq!(EscalationPolicy::resolve(&route(), &gated, false, 0.5).ood_threshold, None);
        let own = RouteConfig { ood_threshold: Some(0.6), ..route() };
        assert_eq!(EscalationPolicy::resolve(&own, &gated, true, 0.5).ood_threshold, Some(0.6));
        assert_eq!(EscalationPolicy::resolve(&own, &descriptor(""), false, 0.5).ood_threshold, None);
    }

    #[test]
    fn decide_prefers_out_of_distribution_over_low_confidence() {
        let policy = EscalationPolicy { head: None, threshold: 0.5, ood_threshold: Some(0.3) };
        assert_eq!(decide(&prediction(0.9, 0.9, Some(0.1)), &policy), None);
        assert_eq!(decide(&prediction(0.4, 0.9, Some(0.1)), &policy), Some(EscalationReason::LowConfidence));
        assert_eq!(decide(&prediction(0.9, 0.9, Some(0.31)), &policy), Some(EscalationReason::OutOfDistribution));
        assert_eq!(decide(&prediction(0.4, 0.9, Some(0.9)), &policy), Some(EscalationReason::OutOfDistribution));
        assert_eq!(decide(&prediction(0.5, 0.9, None), &policy), None, "at the threshold is not below it");
        let no_gate = EscalationPolicy { ood_threshold: None, ..policy.clone() };
        assert_eq!(decide(&prediction(0.9, 0.9, Some(5.0)), &no_gate), None);
    }

    #[test]
    fn decide_reads_the_named_head() {
        let policy = EscalationPolicy { head: Some("other".into()), threshold: 0.5, ood_threshold: None };
        assert_eq!(decide(&prediction(0.1, 0.9, None), &policy), None);
        assert_eq!(decide(&prediction(0.9, 0.2, None), &policy), Some(EscalationReason::LowConfidence));
        let missing = EscalationPolicy { head: Some("absent".into()), ..policy };
        assert_eq!(decide(&prediction(0.1, 0.1, None), &missing), None, "no such head: nothing to decide on");
    }
}
