//! The system features a derivation requires, from `requiredSystemFeatures` or, with structured
//! attributes, from the `__json` environment variable.

use std::collections::BTreeSet;

use error_context::{Classify, Severity};

use super::Derivation;

/// Why a derivation's required features cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeaturesError {
    /// `requiredSystemFeatures` or `__json` is not UTF-8.
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
    /// `__json` is not a JSON object.
    #[error("__json is not a JSON object: {0}")]
    StructuredAttrs(String),
    /// `requiredSystemFeatures` in `__json` is not a list of strings.
    #[error("requiredSystemFeatures in __json is not a list of strings")]
    NotAListOfStrings,
}

impl Classify for FeaturesError {
    fn severity(&self) -> Severity {
        Severity::Reject
    }
}

pub(super) fn required_system_features(
    derivation: &Derivation,
) -> Result<BTreeSet<String>, FeaturesError> {
    if let Some(json) = derivation.env.get(b"__json".as_slice()) {
        let json = std::str::from_utf8(json).map_err(|_| FeaturesError::NotUtf8("__json"))?;
        let attrs: serde_json::Map<String, serde_json::Value> = serde_json::from_str(json)
            .map_err(|error| FeaturesError::StructuredAttrs(error.to_string()))?;
        return match attrs.get("requiredSystemFeatures") {
            None => Ok(BTreeSet::new()),
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .map(|item| {
                    item.as_str()
                        .map(str::to_owned)
                        .ok_or(FeaturesError::NotAListOfStrings)
                })
                .collect(),
            Some(_) => Err(FeaturesError::NotAListOfStrings),
        };
    }
    match derivation.env.get(b"requiredSystemFeatures".as_slice()) {
        None => Ok(BTreeSet::new()),
        Some(value) => Ok(std::str::from_utf8(value)
            .map_err(|_| FeaturesError::NotUtf8("requiredSystemFeatures"))?
            .split([' ', '\t', '\n', '\r'])
            .filter(|feature| !feature.is_empty())
            .map(str::to_owned)
            .collect()),
    }
}
