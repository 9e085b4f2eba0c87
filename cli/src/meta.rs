//! Build metadata on the command line: `--meta key=value`, attached to a build when it is
//! submitted, and filtered on by `list`.

/// Parses a `key=value` metadata argument.
pub fn parse_meta(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("{text:?} is not key=value"))
}
