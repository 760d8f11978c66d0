//! Heads computed in Rust over a graph output (the pooled sentence embedding), as written by
//! `triage train`: a dense linear layer, optionally averaged with a sparse lexical linear layer
//! (TF-IDF over word-piece unigrams and bigrams and, when training chose them, character 3-5
//! grams within words), plus the class centroids that give each message an
//! out-of-distribution score.
//!
//! Weights live in one `heads.safetensors` beside `model.toml`, so a trained model directory is
//! the encoder graph (shared by every head) plus a few hundred kilobytes to a few megabytes.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use super::{Descriptor, ModelError};

pub const WEIGHTS_FILE: &str = "heads.safetensors";
pub const LEXICAL_FEATURES: &str = "lexical.features";
pub const LEXICAL_IDF: &str = "lexical.idf";
pub const OOD_CENTROIDS: &str = "ood.centroids";

/// A feature key: a unigram is its token id, a bigram packs both ids (first + 1 in the high
/// half, so no bigram collides with a unigram), a character n-gram is a 63-bit FNV-1a hash of
/// its UTF-8 bytes with the top bit set (word-piece keys never reach it).
pub type FeatureKey = u64;

const CHAR_GRAM_FLAG: u64 = 1 << 63;

/// Character n-gram lengths, counted within each word padded by one space on both sides
/// (scikit-learn's `char_wb`): " card " gives " ca", "car", "ard", "rd ", " car", ...
pub const CHAR_GRAM_LENGTHS: std::ops::RangeInclusive<usize> = 3..=5;

pub fn unigram(id: u32) -> FeatureKey {
    u64::from(id)
}

pub fn bigram(first: u32, second: u32) -> FeatureKey {
    ((u64::from(first) + 1) << 32) | u64::from(second)
}

pub fn char_gram(gram: &[char]) -> FeatureKey {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut buffer = [0u8; 4];
    for c in gram {
        for byte in c.encode_utf8(&mut buffer).bytes() {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    CHAR_GRAM_FLAG | (hash & !CHAR_GRAM_FLAG)
}

pub fn is_char_gram(key: FeatureKey) -> bool {
    key & CHAR_GRAM_FLAG != 0
}

/// What the lexical layer reads of one message: the word pieces the encoder saw and the text
/// they came from (the same characters, lower-cased here for the character n-grams).
#[derive(Debug, Clone, Copy)]
pub struct LexicalInput<'a> {
    pub ids: &'a [u32],
    pub text: &'a str,
}

/// Which features a lexical vocabulary is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LexicalFeatures {
    /// Word-piece unigrams and bigrams.
    WordPieces,
    /// Those and character 3-5 grams within words.
    WordPiecesAndCharacters,
}

/// Counts of every feature of `input` the family names.
pub fn feature_counts(input: LexicalInput<'_>, features: LexicalFeatures) -> HashMap<FeatureKey, u32> {
    let mut counts = HashMap::with_capacity(input.ids.len() * 2);
    for &id in input.ids {
        *counts.entry(unigram(id)).or_insert(0) += 1;
    }
    for pair in input.ids.windows(2) {
        *counts.entry(bigram(pair[0], pair[1])).or_insert(0) += 1;
    }
    if features == LexicalFeatures::WordPiecesAndCharacters {
        let lower = input.text.to_lowercase();
        let mut padded: Vec<char> = Vec::with_capacity(32);
        for word in lower.split_whitespace() {
            padded.clear();
            padded.push(' ');
            padded.extend(word.chars());
            padded.push(' ');
            for n in CHAR_GRAM_LENGTHS {
                for gram in padded.windows(n) {
                    *counts.entry(char_gram(gram)).or_insert(0) += 1;
                }
            }
        }
    }
    counts
}

/// A sparse, L2-normalised feature vector: (column, value) sorted by column.
pub type SparseRow = Vec<(u32, f32)>;

/// The lexical feature space fixed at training: known features (sorted) and their IDF.
#[derive(Debug, Clone, PartialEq)]
pub struct LexicalVocabulary {
    keys: Vec<FeatureKey>,
    idf: Vec<f32>,
}

impl LexicalVocabulary {
    /// From (feature, document frequency) over `documents` texts; smooth IDF as in the usual
    /// TF-IDF: ln((1 + n) / (1 + df)) + 1.
    pub fn from_document_frequencies(mut df: Vec<(FeatureKey, u32)>, documents: usize) -> Self {
        df.sort_unstable_by_key(|(k, _)| *k);
        let n = documents as f32;
        let idf = df.iter().map(|&(_, d)| ((1.0 + n) / (1.0 + d as f32)).ln() + 1.0).collect();
        LexicalVocabulary { keys: df.into_iter().map(|(k, _)| k).collect(), idf }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The family this vocabulary was built from (character n-grams sort last: top bit set).
    pub fn features(&self) -> LexicalFeatures {
        match self.keys.last() {
            Some(&key) if is_char_gram(key) => LexicalFeatures::WordPiecesAndCharacters,
            _ => LexicalFeatures::WordPieces,
        }
    }

    /// Sublinear TF (1 + ln tf) times IDF, L2-normalised; unknown features are dropped.
    pub fn transform(&self, input: LexicalInput<'_>) -> SparseRow {
        let mut row: SparseRow = feature_counts(input, self.features())
            .into_iter()
            .filter_map(|(key, tf)| {
                let column = self.keys.binary_search(&key).ok()?;
                Some((column as u32, (1.0 + (tf as f32).ln()) * self.idf[column]))
            })
            .collect();
        row.sort_unstable_by_key(|(c, _)| *c);
        let norm = row.iter().map(|(_, v)| v * v).sum::<f32>().sqrt();
        if norm > 0.0 {
            row.iter_mut().for_each(|(_, v)| *v /= norm);
        }
        row
    }

    pub fn keys(&self) -> &[FeatureKey] {
        &self.keys
    }

    pub fn idf(&self) -> &[f32] {
        &self.idf
    }
}

/// `labels x inputs` weights and a bias per label: logits = W x + b.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseLayer {
    pub labels: usize,
    pub inputs: usize,
    /// Row-major [labels, inputs].
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

impl DenseLayer {
    pub fn logits(&self, x: &[f32]) -> Vec<f32> {
        self.weight.chunks_exact(self.inputs).zip(&self.bias).map(|(w, b)| b + w.iter().zip(x).map(|(a, b)| a * b).sum::<f32>()).collect()
    }
}

/// Sparse-input layer: weights stored feature-major [features, labels], so one message touches
/// only the rows of the features it has.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseLayer {
    pub labels: usize,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

impl SparseLayer {
    pub fn logits(&self, x: &SparseRow) -> Vec<f32> {
        let mut out = self.bias.clone();
        for &(column, value) in x {
            let row = &self.weight[column as usize * self.labels..(column as usize + 1) * self.labels];
            out.iter_mut().zip(row).for_each(|(o, w)| *o += value * w);
        }
        out
    }
}

/// One computed head: its dense layer and, optionally, the lexical layer averaged with it.
#[derive(Debug, Clone, PartialEq)]
pub struct ComputedHead {
    pub dense: DenseLayer,
    /// (layer, share of the lexical probabilities in the average).
    pub lexical: Option<(SparseLayer, f32)>,
}

/// Everything `heads.safetensors` holds, resolved for the heads that use it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeadWeights {
    pub heads: HashMap<String, ComputedHead>,
    pub vocabulary: Option<LexicalVocabulary>,
    /// Unit-length class centroids of the training embeddings, [classes, dim] row-major.
    pub centroids: Option<DenseMatrix>,
}

impl HeadWeights {
    /// Read and check what `descriptor` needs from `dir/heads.safetensors` (nothing, and no
    /// file needed, for a model without computed heads or an OOD gate).
    pub fn load(dir: &Path, descriptor: &Descriptor) -> Result<Self, ModelError> {
        if !descriptor.needs_weights() {
            return Ok(HeadWeights::default());
        }
        let path = dir.join(WEIGHTS_FILE);
        if !path.is_file() {
            return Err(ModelError::MissingFile { path, what: "head weights (model.toml names computed heads or an ood gate)" });
        }
        let bytes = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
        let file = WeightsFile::parse(&path, &bytes)?;
        let mut weights = HeadWeights::default();
        // Every layer reading one graph output must agree on its width.
        let mut widths: HashMap<&str, usize> = HashMap::new();
        for spec in descriptor.heads.iter().filter(|h| h.is_computed()) {
            let prefix = spec.weights.as_deref().unwrap_or_default();
            let dense = file.dense_layer(prefix, spec.labels.len())?;
            if *widths.entry(spec.output.as_str()).or_insert(dense.inputs) != dense.inputs {
                return Err(ModelError::invalid(
                    &path,
                    format!("head `{}` reads {} inputs, unlike the other heads on `{}`", spec.name, dense.inputs, spec.output),
                ));
            }
            let lexical = match spec.lexical_share {
                Some(share) if share > 0.0 => {
                    if weights.vocabulary.is_none() {
                        weights.vocabulary = Some(file.vocabulary()?);
                    }
                    let features = weights.vocabulary.as_ref().map_or(0, LexicalVocabulary::len);
                    Some((file.sparse_layer(&lexical_prefix(prefix), features, spec.labels.len())?, share))
                }
                _ => None,
            };
            weights.heads.insert(spec.name.clone(), ComputedHead { dense, lexical });
        }
        if let Some(ood) = &descriptor.ood {
            let centroids = file.matrix(OOD_CENTROIDS)?;
            if centroids.rows == 0 || widths.get(ood.output.as_str()).is_some_and(|&n| n != centroids.cols) {
                return Err(ModelError::invalid(
                    &path,
                    format!("tensor `{OOD_CENTROIDS}` has shape [{}, {}]", centroids.rows, centroids.cols),
                ));
            }
            weights.centroids = Some(centroids);
        }
        Ok(weights)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DenseMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl DenseMatrix {
    /// 1 - the highest cosine similarity of `x` to any row: 0 for a message exactly like a
    /// class centroid, rising towards 1 (and above) for text unlike the training data.
    pub fn distance_to_nearest(&self, x: &[f32]) -> f32 {
        let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        let best = self
            .data
            .chunks_exact(self.cols)
            .map(|c| c.iter().zip(x).map(|(a, b)| a * b).sum::<f32>() / norm)
            .fold(f32::NEG_INFINITY, f32::max);
        1.0 - best
    }
}

/// The tensors a computed head named `prefix` reads.
pub fn weight_name(prefix: &str) -> String {
    format!("{prefix}.weight")
}
pub fn bias_name(prefix: &str) -> String {
    format!("{prefix}.bias")
}
pub fn lexical_prefix(prefix: &str) -> String {
    format!("{prefix}.lexical")
}

/// A reader over the file with errors that name the file and the tensor.
pub struct WeightsFile<'a> {
    path: &'a Path,
    tensors: SafeTensors<'a>,
}

impl<'a> WeightsFile<'a> {
    pub fn parse(path: &'a Path, bytes: &'a [u8]) -> Result<Self, ModelError> {
        let tensors = SafeTensors::deserialize(bytes).map_err(|e| ModelError::invalid(path, format!("not a safetensors file: {e}")))?;
        Ok(WeightsFile { path, tensors })
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.tensor(name).is_ok()
    }

    fn view(&self, name: &str, dtype: Dtype) -> Result<(Vec<usize>, &'a [u8]), ModelError> {
        let view = self.tensors.tensor(name).map_err(|_| ModelError::invalid(self.path, format!("has no tensor `{name}`")))?;
        if view.dtype() != dtype {
            return Err(ModelError::invalid(self.path, format!("tensor `{name}` is {:?}, expected {dtype:?}", view.dtype())));
        }
        Ok((view.shape().to_vec(), view.data()))
    }

    pub fn f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        let (shape, bytes) = self.view(name, Dtype::F32)?;
        Ok((shape, bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()))
    }

    pub fn u64(&self, name: &str) -> Result<(Vec<usize>, Vec<u64>), ModelError> {
        let (shape, bytes) = self.view(name, Dtype::U64)?;
        Ok((shape, bytes.chunks_exact(8).map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect()))
    }

    pub fn matrix(&self, name: &str) -> Result<DenseMatrix, ModelError> {
        let (shape, data) = self.f32(name)?;
        match shape[..] {
            [rows, cols] => Ok(DenseMatrix { rows, cols, data }),
            _ => Err(ModelError::invalid(self.path, format!("tensor `{name}` has shape {shape:?}, expected 2 dimensions"))),
        }
    }

    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let (shape, data) = self.f32(name)?;
        if shape != [len] {
            return Err(ModelError::invalid(self.path, format!("tensor `{name}` has shape {shape:?}, expected [{len}]")));
        }
        Ok(data)
    }

    pub fn dense_layer(&self, prefix: &str, labels: usize) -> Result<DenseLayer, ModelError> {
        let weight = self.matrix(&weight_name(prefix))?;
        if weight.rows != labels {
            return Err(ModelError::invalid(
                self.path,
                format!("tensor `{}` has {} rows but the head has {labels} labels", weight_name(prefix), weight.rows),
            ));
        }
        let bias = self.vector(&bias_name(prefix), labels)?;
        Ok(DenseLayer { labels, inputs: weight.cols, weight: weight.data, bias })
    }

    pub fn sparse_layer(&self, prefix: &str, features: usize, labels: usize) -> Result<SparseLayer, ModelError> {
        let weight = self.matrix(&weight_name(prefix))?;
        if weight.rows != features || weight.cols != labels {
            return Err(ModelError::invalid(
                self.path,
                format!("tensor `{}` has shape [{}, {}], expected [{features}, {labels}]", weight_name(prefix), weight.rows, weight.cols),
            ));
        }
        let bias = self.vector(&bias_name(prefix), labels)?;
        Ok(SparseLayer { labels, weight: weight.data, bias })
    }

    pub fn vocabulary(&self) -> Result<LexicalVocabulary, ModelError> {
        let (_, keys) = self.u64(LEXICAL_FEATURES)?;
        let idf = self.vector(LEXICAL_IDF, keys.len())?;
        if keys.windows(2).any(|w| w[0] >= w[1]) {
            return Err(ModelError::invalid(self.path, format!("tensor `{LEXICAL_FEATURES}` is not sorted")));
        }
        Ok(LexicalVocabulary { keys, idf })
    }

    pub fn path(&self) -> &Path {
        self.path
    }
}

/// Serialise tensors (f32 and u64) into safetensors bytes.
pub fn serialize(f32s: &[(String, Vec<usize>, &[f32])], u64s: &[(String, Vec<usize>, &[u64])]) -> Result<Vec<u8>, String> {
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, shape, data) in f32s {
        owned.push((name.clone(), Dtype::F32, shape.clone(), data.iter().flat_map(|v| v.to_le_bytes()).collect()));
    }
    for (name, shape, data) in u64s {
        owned.push((name.clone(), Dtype::U64, shape.clone(), data.iter().flat_map(|v| v.to_le_bytes()).collect()));
    }
    let views = owned
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).map(|v| (name.clone(), v)).map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, None).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bigrams_never_collide_with_unigrams_and_keep_order() {
        assert_ne!(bigram(0, 5), unigram(5));
        assert_ne!(bigram(1, 2), bigram(2, 1));
        let counts = feature_counts(LexicalInput { ids: &[7, 8, 7, 8], text: "Card card" }, LexicalFeatures::WordPieces);
        assert_eq!(counts[&unigram(7)], 2);
        assert_eq!(counts[&bigram(7, 8)], 2);
        assert_eq!(counts[&bigram(8, 7)], 1);
        assert_eq!(counts.len(), 4, "no character n-grams unless asked");
    }

    #[test]
    fn character_grams_stay_within_words_and_ignore_case() {
        let grams = |text: &str| feature_counts(LexicalInput { ids: &[], text }, LexicalFeatures::WordPiecesAndCharacters);
        let chars = |s: &str| s.chars().collect::<Vec<_>>();
        let counts = grams("Card  CARD\tpin");
        // " card " has 4 trigrams, 3 four-grams, 2 five-grams; it occurs twice.
        assert_eq!(counts[&char_gram(&chars(" ca"))], 2);
        assert_eq!(counts[&char_gram(&chars("card "))], 2);
        assert_eq!(counts[&char_gram(&chars(" pin "))], 1);
        assert!(!counts.contains_key(&char_gram(&chars("d p"))), "no gram spans two words");
        assert_eq!(counts.len(), 9 + 6, "card: 9 distinct grams, pin: 3 + 2 + 1");
        assert!(counts.keys().all(|&k| is_char_gram(k)));
        assert!(!is_char_gram(bigram(u32::MAX, u32::MAX)), "word-piece keys never carry the flag");
        // Reference values shared with models/scripts/make_golden.py (FNV-1a 64 of the UTF-8).
        assert_eq!(char_gram(&chars(" ca")), 0x8000_0000_0000_0000 | (0xc2cd_a117_cdf2_264f & !(1u64 << 63)));
        assert_ne!(char_gram(&chars("é")), char_gram(&chars("e")));
    }

    #[test]
    fn transform_is_unit_length_and_drops_unknown_features() {
        let vocab = LexicalVocabulary::from_document_frequencies(vec![(unigram(3), 1), (unigram(1), 10), (bigram(1, 3), 2)], 10);
        let words = |ids| LexicalInput { ids, text: "" };
        let row = vocab.transform(words(&[1, 3, 99]));
        assert_eq!(row.len(), 3);
        assert!(row.windows(2).all(|w| w[0].0 < w[1].0));
        let norm: f32 = row.iter().map(|(_, v)| v * v).sum();
        assert!((norm - 1.0).abs() < 1e-5);
        // The rarer feature weighs more.
        let weight_of = |key| row.iter().find(|(c, _)| vocab.keys()[*c as usize] == key).map(|(_, v)| *v).unwrap();
        assert!(weight_of(unigram(3)) > weight_of(unigram(1)));
        assert!(vocab.transform(words(&[42])).is_empty());
        assert_eq!(vocab.features(), LexicalFeatures::WordPieces);
    }

    #[test]
    fn layers_compute_w_x_plus_b() {
        let dense = DenseLayer { labels: 2, inputs: 3, weight: vec![1.0, 0.0, 0.0, 0.0, 2.0, 1.0], bias: vec![0.5, -1.0] };
        assert_eq!(dense.logits(&[1.0, 2.0, 3.0]), vec![1.5, 6.0]);
        let sparse = SparseLayer { labels: 2, weight: vec![1.0, 2.0, 3.0, 4.0], bias: vec![0.0, 1.0] };
        assert_eq!(sparse.logits(&vec![(1, 0.5)]), vec![1.5, 3.0]);
    }

    #[test]
    fn distance_to_nearest_centroid() {
        let c = DenseMatrix { rows: 2, cols: 2, data: vec![1.0, 0.0, 0.0, 1.0] };
        assert!(c.distance_to_nearest(&[2.0, 0.0]).abs() < 1e-6);
        assert!((c.distance_to_nearest(&[-1.0, 0.0]) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn serialized_tensors_read_back() {
        let bytes =
            serialize(&[("a.weight".into(), vec![2, 2], &[1.0, 2.0, 3.0, 4.0])], &[(LEXICAL_FEATURES.into(), vec![2], &[1, 9])]).unwrap();
        let path = Path::new("heads.safetensors");
        let file = WeightsFile::parse(path, &bytes).unwrap();
        assert_eq!(file.matrix("a.weight").unwrap().data, vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(file.u64(LEXICAL_FEATURES).unwrap().1, vec![1, 9]);
        let err = file.f32("missing").unwrap_err().to_string();
        assert!(err.contains("missing") && err.contains("heads.safetensors"), "{err}");
        assert!(file.f32(LEXICAL_FEATURES).unwrap_err().to_string().contains("expected F32"));
        assert!(WeightsFile::parse(path, b"junk").is_err());
    }
}
