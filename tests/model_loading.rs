//! Loading model directories of both kinds, and the errors that name what is wrong.

mod common;

use std::process::Command;

use triage::model::{HeadOutput, InferenceOptions, Model, ModelError, Provider};

fn run_one(model: &Model, subject: &str, body: &str) -> triage::Prediction {
    let rendered = model.template().render(
        |f| match f {
            "subject" => Some(subject),
            "body" => Some(body),
            _ => None,
        },
        model.encoder().max_chars(),
    );
    let encoded = model.encoder().encode_rendered(&rendered).expect("tokenize");
    let mut session = model.session().expect("session");
    session.run(&[&encoded]).expect("run").pop().expect("one prediction")
}

#[test]
fn default_model_loads_with_its_descriptor() {
    let model = common::default_model();
    let info = model.info();
    assert_eq!(info.name, "customer-service");
    assert_eq!(info.max_length, 128);
    assert_eq!(info.provider, Provider::Cpu);
    assert_eq!(info.fingerprint.len(), 12);
    let p = run_one(&model, "Lost card", "I lost my card yesterday, please block it");
    assert_eq!(p.category.as_ref().map(|c| c.label.as_str()), Some("lost_or_stolen_card"));
    assert_eq!(p.priority.as_deref(), Some("urgent"));
    let Some(HeadOutput::Embedding(e)) = p.head("embedding") else { panic!("embedding head missing") };
    let norm: f32 = e.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "embedding is L2-normalised, norm {norm}");
}

#[test]
fn optimum_export_loads_from_config_json_alone() {
    let dir = common::test_model_dir("optimum-tiny");
    assert!(!dir.join("model.toml").exists());
    let model = common::load(&dir);
    assert_eq!(model.info().name, "optimum-tiny");
    let heads = model.heads().heads();
    assert_eq!(heads.len(), 1);
    assert_eq!(heads[0].output, "logits");
    assert_eq!(heads[0].labels, vec!["billing", "returns", "technical"]);
    let p = run_one(&model, "", "My parcel arrived broken and I want to send it back");
    let c = p.category.expect("category from the logits head");
    assert!(["billing", "returns", "technical"].contains(&c.label.as_str()));
    assert!(c.score > 1.0 / 3.0 && c.score <= 1.0, "softmax top probability {}", c.score);
}

#[test]
fn optimum_multi_label_export_uses_sigmoid_and_detects_inputs() {
    // This graph has no token_type_ids input: inputs come from the graph, not a fixed list.
    let model = common::load(&common::test_model_dir("optimum-multilabel-tiny"));
    let p = run_one(&model, "Late and damaged", "The parcel came a week late and the box was crushed");
    assert!(p.category.is_none(), "a multi-label head is not a category");
    let Some(HeadOutput::Tags(tags)) = p.head("category") else { panic!("tags head missing") };
    for t in tags {
        assert!(t.score >= 0.5 && t.score <= 1.0, "sigmoid score above threshold: {t:?}");
    }
}

#[test]
fn multi_head_model_gives_category_priority_tags_and_embedding() {
    let model = common::load(&common::test_model_dir("multihead-tiny"));
    assert_eq!(model.info().version, "0.0.1");
    let mut seen_tags = 0;
    for body in ["refund for damaged item", "I cannot log in", "invoice is wrong", "where is my parcel", "angry!!!"] {
        let p = run_one(&model, "Help", body);
        let category = p.category.as_ref().expect("category");
        assert!(["account", "billing", "delivery", "returns", "technical"].contains(&category.label.as_str()));
        let priority = p.priority.as_deref().expect("priority from the priority head");
        assert!(["low", "normal", "high", "urgent"].contains(&priority));
        for t in &p.tags {
            let threshold = if t.label == "angry" { 0.9 } else { 0.5 };
            assert!(t.score >= threshold, "{t:?} below its threshold");
        }
        seen_tags += p.tags.len();
        assert!(matches!(p.head("embedding"), Some(HeadOutput::Embedding(v)) if v.len() == 16));
    }
    assert!(seen_tags > 0, "random tag logits should put some tag above 0.5");
}

#[test]
fn missing_tokenizer_is_named() {
    let dir = common::copy_model(&common::test_model_dir("optimum-tiny"));
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = Model::load(dir.path(), &InferenceOptions::default()).unwrap_err();
    assert!(matches!(err, ModelError::MissingFile { .. }), "{err:?}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn missing_graph_is_named() {
    let dir = common::copy_model(&common::test_model_dir("optimum-tiny"));
    std::fs::remove_file(dir.path().join("model.onnx")).unwrap();
    let err = Model::load(dir.path(), &InferenceOptions::default()).unwrap_err();
    assert!(err.to_string().contains("model.onnx"), "{err}");
}

#[test]
fn an_output_the_descriptor_names_but_the_graph_lacks_is_named() {
    let dir = common::copy_model(&common::test_model_dir("multihead-tiny"));
    let toml = std::fs::read_to_string(dir.path().join("model.toml")).unwrap();
    std::fs::write(dir.path().join("model.toml"), common::replaced(&toml, "output = \"priority_probs\"", "output = \"urgency_probs\""))
        .unwrap();
    let err = Model::load(dir.path(), &InferenceOptions::default()).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ModelError::MissingOutput { .. }), "{err:?}");
    assert!(text.contains("urgency_probs") && text.contains("priority_probs"), "names the missing and the available outputs: {text}");
}

#[test]
fn label_count_mismatch_with_the_graph_is_named() {
    let dir = common::copy_model(&common::test_model_dir("multihead-tiny"));
    let toml = std::fs::read_to_string(dir.path().join("model.toml")).unwrap();
    std::fs::write(dir.path().join("model.toml"), common::replaced(&toml, r#"["low", "normal", "high", "urgent"]"#, r#"["low", "high"]"#))
        .unwrap();
    let err = Model::load(dir.path(), &InferenceOptions::default()).unwrap_err();
    assert!(err.to_string().contains("priority"), "{err}");
}

#[test]
fn gpu_provider_on_a_cpu_library_falls_back_to_cpu() {
    let options = InferenceOptions { providers: vec![Provider::Cuda, Provider::Cpu], ..InferenceOptions::default() };
    let model = Model::load(common::test_model_dir("optimum-tiny"), &options).expect("falls back instead of failing");
    assert_eq!(model.info().provider, Provider::Cpu);
}

#[test]
fn cuda_library_folders_without_the_libraries_still_fall_back_to_cpu() {
    let empty = tempfile::tempdir().unwrap();
    let options = InferenceOptions {
        providers: vec![Provider::Cuda, Provider::Cpu],
        cuda_library_dirs: vec![empty.path().to_path_buf()],
        ..InferenceOptions::default()
    };
    let model = Model::load(common::test_model_dir("optimum-tiny"), &options).expect("falls back instead of failing");
    assert_eq!(model.info().provider, Provider::Cpu);
}

// ONNX Runtime's environment is process-wide, so library problems are tested in child processes.

fn triage_classify_with_library(library: &std::path::Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_triage"))
        .args(["classify", "--model"])
        .arg(common::test_model_dir("optimum-tiny"))
        .arg("--ort-library")
        .arg(library)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run triage");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_missing_library_stops_with_one_clear_sentence() {
    let (code, stderr) = triage_classify_with_library(std::path::Path::new("/nonexistent/libonnxruntime.so"));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("ONNX Runtime library not found") && stderr.contains("scripts/setup"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_library_of_the_wrong_version_is_refused_by_name() {
    // A stand-in libonnxruntime that reports version 1.20.0, as an old install would.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("fake_ort.c");
    std::fs::write(
        &src,
        r#"
        typedef struct { const void* (*GetApi)(unsigned); const char* (*GetVersionString)(void); } OrtApiBase;
        static const void* get_api(unsigned v) { (void)v; return 0; }
        static const char* version(void) { return "1.20.0"; }
        static const OrtApiBase base = { get_api, version };
        const OrtApiBase* OrtGetApiBase(void) { return &base; }
        "#,
    )
    .unwrap();
    let lib = dir.path().join("libonnxruntime.so.1.20.0");
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .status()
        .expect("cc (gcc) is needed to build the stand-in library");
    assert!(status.success());
    let (code, stderr) = triage_classify_with_library(&lib);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("is version 1.20.0") && stderr.contains("needs 1.31 or newer"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_file_that_is_not_onnx_runtime_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("libonnxruntime.so");
    std::fs::write(&bogus, b"definitely not an ELF file").unwrap();
    let (code, stderr) = triage_classify_with_library(&bogus);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("could not be loaded"), "{stderr}");
}
