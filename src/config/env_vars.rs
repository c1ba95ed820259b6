//! `${VAR}` references in the file, replaced from the environment before it is read.

use super::{invalid, ConfigError};

/// Replaces `${VAR}` inside every string, reporting the key of an unset variable.
pub(super) fn substitute_env(
    value: &mut serde_norway::Value,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    use serde_norway::Value;
    match value {
        Value::String(s) if s.contains("${") => {
            let mut out = String::with_capacity(s.len());
            let mut rest = s.as_str();
            while let Some(start) = rest.find("${") {
                out.push_str(&rest[..start]);
                let after = &rest[start + 2..];
                let end = after
                    .find('}')
                    .ok_or_else(|| invalid(key, "unterminated ${...} reference"))?;
                let name = &after[..end];
                let val = env(name).ok_or_else(|| {
                    invalid(key, format!("environment variable {name} is not set"))
                })?;
                out.push_str(&val);
                rest = &after[end + 1..];
            }
            out.push_str(rest);
            *s = out;
        }
        Value::Mapping(map) => {
            for (k, v) in map.iter_mut() {
                let name = k.as_str().unwrap_or("?");
                let child = if key.is_empty() {
                    name.to_string()
                } else {
                    format!("{key}.{name}")
                };
                substitute_env(v, &child, env)?;
            }
        }
        Value::Sequence(seq) => {
            for (i, v) in seq.iter_mut().enumerate() {
                substitute_env(v, &format!("{key}[{i}]"), env)?;
            }
        }
        _ => {}
    }
    Ok(())
}
