//! Which model versions have series on /metrics. The `metrics` facade cannot unregister a
//! series, so a replaced version's series (batch and inference histograms, messages
//! classified, `triage_model_info`) are left out of what /metrics renders once nothing runs
//! it any more: dashboards and `count by (model_version)` see only versions serving, and a
//! version that comes back (a rollback) shows again, its counters where they were.
//!
//! A version serves while an engine generation of it exists (counted: a rollback can install
//! version A again before the old A's last batch ends). What the recorder keeps of a
//! replaced version is a few histograms, bounded by the number of reloads.

use std::collections::BTreeMap;
use std::sync::Mutex;

static LIVE: Mutex<BTreeMap<(String, String), usize>> = Mutex::new(BTreeMap::new());

/// A generation of `model` at `version` exists (paired with [`released`]).
pub fn serving(model: &str, version: &str) {
    if let Ok(mut live) = LIVE.lock() {
        *live.entry((model.to_string(), version.to_string())).or_insert(0) += 1;
    }
}

/// A generation of `model` at `version` is gone.
pub fn released(model: &str, version: &str) {
    if let Ok(mut live) = LIVE.lock() {
        if let Some(n) = live.get_mut(&(model.to_string(), version.to_string())) {
            *n = n.saturating_sub(1);
        }
    }
}

/// The (model, version) pairs that served once and serve no more.
fn replaced() -> Vec<(String, String)> {
    LIVE.lock().map(|live| live.iter().filter(|(_, n)| **n == 0).map(|(k, _)| k.clone()).collect()).unwrap_or_default()
}

/// Prometheus text without the sample lines of replaced versions: a line whose labels name
/// `model="<m>"` and `model_version="<v>"` for a replaced pair.
pub fn without_replaced(text: &str) -> String {
    filter(text, &replaced())
}

fn filter(text: &str, replaced: &[(String, String)]) -> String {
    if replaced.is_empty() {
        return text.to_string();
    }
    let needles: Vec<(String, String)> =
        replaced.iter().map(|(m, v)| (format!("model=\"{}\"", escape(m)), format!("model_version=\"{}\"", escape(v)))).collect();
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let labels = match (line.starts_with('#'), line.find('{'), line.rfind('}')) {
            (false, Some(open), Some(close)) if open < close => &line[open..=close],
            _ => "",
        };
        // Label pairs are comma-separated inside the braces: match whole pairs, so `model="a"`
        // is not found inside `xmodel="a"` or `model="ab"`.
        let has = |pair: &str| labels.split([',', '{', '}']).any(|p| p == pair);
        if labels.is_empty() || !needles.iter().any(|(m, v)| has(m) && has(v)) {
            out.push_str(line);
        }
    }
    out
}

/// Label-value escaping of the text exposition format.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE triage_model_info gauge\n\
        triage_model_info{model=\"support\",model_version=\"7\",provider=\"cpu\"} 1\n\
        triage_model_info{model=\"support\",model_version=\"8\",provider=\"cpu\"} 1\n\
        triage_model_info{model=\"support-x\",model_version=\"7\",provider=\"cpu\"} 1\n\
        triage_batch_size_bucket{model=\"support\",model_version=\"7\",le=\"1\"} 3\n\
        triage_batch_size_bucket{model=\"support\",model_version=\"77\",le=\"1\"} 3\n\
        triage_in_flight 4\n";

    #[test]
    fn only_the_replaced_pairs_lines_are_left_out() {
        let out = filter(TEXT, &[("support".into(), "7".into())]);
        assert!(!out.contains("model=\"support\",model_version=\"7\","), "{out}");
        for kept in
            ["model_version=\"8\"", "model=\"support-x\",model_version=\"7\"", "model_version=\"77\"", "triage_in_flight 4", "# TYPE"]
        {
            assert!(out.contains(kept), "{kept} missing from:\n{out}");
        }
        assert_eq!(out.lines().count(), TEXT.lines().count() - 2);
        assert_eq!(filter(TEXT, &[]), TEXT);
    }

    #[test]
    fn a_version_is_replaced_only_when_its_last_generation_is_gone() {
        let (m, v) = ("versions-test-model", "1");
        serving(m, v);
        serving(m, v); // a rollback installed it again before the first ended
        released(m, v);
        assert!(!replaced().contains(&(m.into(), v.into())));
        released(m, v);
        assert!(replaced().contains(&(m.into(), v.into())));
        serving(m, v);
        assert!(!replaced().contains(&(m.into(), v.into())), "a version that comes back shows again");
    }
}
