//! One environment scheme for every command: `TRIAGE_<SECTION>__<FIELD>` (double underscore
//! between levels, case-insensitive) names a field of the configuration file, e.g.
//! `TRIAGE_KAFKA__BOOTSTRAP_SERVERS=broker:9092`, `TRIAGE_BATCHING__MAX_BATCH_SIZE=8`. Values
//! parse as TOML (numbers, booleans, arrays) and fall back to strings. `triage run` applies them
//! over its file; the other commands' flags read the same names.
//!
//! The flat names of earlier releases (`TRIAGE_MAX_BATCH_SIZE`, ...) stay as aliases
//! ([`ALIASES`]); the sectioned name wins when both are set. Variables outside the known
//! sections are ignored (Kubernetes injects `TRIAGE_METRICS_SERVICE_HOST` and the like), but an
//! unknown field of a known section is an error naming the variable: a typo must not be
//! silently ignored.

pub const ENV_PREFIX: &str = "TRIAGE_";

/// Sections of the configuration file that take `TRIAGE_<SECTION>__<FIELD>`.
pub const SECTIONS: &[&str] = &["kafka", "clickhouse", "batching", "inference", "escalation", "shutdown", "metrics", "routes"];

/// Top-level scalar fields, overridable as `TRIAGE_<FIELD>`.
const TOP_LEVEL_FIELDS: &[&str] = &["worker_id", "max_message_bytes"];

/// Flat names kept as aliases: (alias, the sectioned name it stands for, a comma list?).
pub const ALIASES: &[(&str, &str, bool)] = &[
    ("TRIAGE_ORT_LIBRARY", "TRIAGE_INFERENCE__ORT_LIBRARY", false),
    ("TRIAGE_PROVIDERS", "TRIAGE_INFERENCE__PROVIDERS", true),
    ("TRIAGE_INTRA_THREADS", "TRIAGE_INFERENCE__INTRA_THREADS", false),
    ("TRIAGE_MAX_LENGTH", "TRIAGE_INFERENCE__MAX_LENGTH", false),
    ("TRIAGE_TEMPLATE", "TRIAGE_INFERENCE__TEMPLATE", false),
    ("TRIAGE_MAX_BATCH_SIZE", "TRIAGE_BATCHING__MAX_BATCH_SIZE", false),
    ("TRIAGE_MAX_BATCH_TOKENS", "TRIAGE_BATCHING__MAX_BATCH_TOKENS", false),
    ("TRIAGE_MAX_WAIT_MS", "TRIAGE_BATCHING__MAX_WAIT_MS", false),
    ("TRIAGE_BUCKET_WINDOW", "TRIAGE_BATCHING__BUCKET_WINDOW", false),
    ("TRIAGE_BATCH_COST_TOKENS", "TRIAGE_BATCHING__BATCH_COST_TOKENS", false),
    ("TRIAGE_TOKENIZER_THREADS", "TRIAGE_BATCHING__TOKENIZER_THREADS", false),
    ("TRIAGE_INFERENCE_THREADS", "TRIAGE_BATCHING__INFERENCE_THREADS", false),
];

/// Rewrite aliases to their sectioned names (dropping an alias whose sectioned name is also
/// set), keeping every other variable as it is.
pub fn resolve_aliases(vars: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
    let vars: Vec<(String, String)> = vars.into_iter().collect();
    let set = |name: &str| vars.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    let mut out = Vec::with_capacity(vars.len());
    for (key, value) in &vars {
        match ALIASES.iter().find(|(alias, ..)| key.eq_ignore_ascii_case(alias)) {
            Some((_, sectioned, _)) if set(sectioned) => {}
            Some((_, sectioned, list)) => {
                let value = if *list { comma_list(value) } else { value.clone() };
                out.push((sectioned.to_string(), value));
            }
            None => out.push((key.clone(), value.clone())),
        }
    }
    out
}

/// For the commands whose flags read the sectioned names: give each alias set in this
/// process's environment its sectioned name. Call once at start, before any thread exists.
pub fn export_aliases() {
    for (alias, sectioned, _) in ALIASES {
        if let (Ok(value), Err(_)) = (std::env::var(alias), std::env::var(sectioned)) {
            std::env::set_var(sectioned, value);
        }
    }
}

fn comma_list(raw: &str) -> String {
    let items: Vec<String> = raw.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| format!("{s:?}")).collect();
    format!("[{}]", items.join(", "))
}

/// Apply `TRIAGE_*` overrides to a parsed file. Returns the variables applied, or the
/// offending variable and why.
pub fn apply(root: &mut toml::Value, vars: impl IntoIterator<Item = (String, String)>) -> Result<Vec<String>, (String, String)> {
    let mut applied = Vec::new();
    for (key, raw) in resolve_aliases(vars) {
        let Some(path) = key.get(..ENV_PREFIX.len()).filter(|p| p.eq_ignore_ascii_case(ENV_PREFIX)).map(|_| &key[ENV_PREFIX.len()..])
        else {
            continue;
        };
        let segments: Vec<String> = path.split("__").map(|s| s.to_ascii_lowercase()).collect();
        let known = match segments.as_slice() {
            [field] => TOP_LEVEL_FIELDS.contains(&field.as_str()),
            [section, ..] => SECTIONS.contains(&section.as_str()),
            [] => false,
        };
        if !known {
            continue;
        }
        set_path(root, &segments, parse_env_value(&raw)).map_err(|message| (key.clone(), message))?;
        applied.push(key);
    }
    Ok(applied)
}

fn parse_env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

fn set_path(root: &mut toml::Value, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty override path")?;
    let mut node = root;
    for seg in parents {
        let table = node.as_table_mut().ok_or_else(|| format!("`{seg}` is not a section"))?;
        node = table.entry(seg.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Array(items) = node {
            return Err(format!("`{seg}` is a list ({} entries): override it in the file", items.len()));
        }
    }
    node.as_table_mut().ok_or_else(|| format!("cannot set `{last}`: its parent is not a section"))?.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn aliases_become_sectioned_names_and_lose_to_them() {
        let out = resolve_aliases(vars(&[("TRIAGE_MAX_BATCH_SIZE", "8"), ("TRIAGE_PROVIDERS", "cuda, cpu"), ("OTHER", "x")]));
        assert!(out.contains(&("TRIAGE_BATCHING__MAX_BATCH_SIZE".into(), "8".into())));
        assert!(out.contains(&("TRIAGE_INFERENCE__PROVIDERS".into(), "[\"cuda\", \"cpu\"]".into())));
        assert!(out.contains(&("OTHER".into(), "x".into())));
        let both = resolve_aliases(vars(&[("TRIAGE_MAX_BATCH_SIZE", "8"), ("TRIAGE_BATCHING__MAX_BATCH_SIZE", "16")]));
        assert_eq!(both, vars(&[("TRIAGE_BATCHING__MAX_BATCH_SIZE", "16")]));
    }

    #[test]
    fn variables_outside_the_known_sections_are_ignored() {
        let mut root: toml::Value = toml::from_str("a = 1").unwrap();
        let applied = apply(
            &mut root,
            vars(&[("TRIAGE_METRICS_SERVICE_HOST", "10.0.0.1"), ("TRIAGE_SOMETHING__ELSE", "1"), ("TRIAGE_MODEL", "m"), ("PATH", "/bin")]),
        )
        .unwrap();
        assert!(applied.is_empty(), "{applied:?}");
        assert_eq!(root, toml::from_str::<toml::Value>("a = 1").unwrap());
    }

    #[test]
    fn every_alias_names_a_known_section() {
        for (alias, sectioned, _) in ALIASES {
            let section = sectioned.strip_prefix(ENV_PREFIX).and_then(|p| p.split("__").next()).unwrap().to_ascii_lowercase();
            assert!(SECTIONS.contains(&section.as_str()), "{alias} -> {sectioned}");
        }
    }
}
