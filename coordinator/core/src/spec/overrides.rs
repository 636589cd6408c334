//! `--set FIELD=VALUE`: a spec file's field replaced from the command line (`flotilla submit`,
//! `validate` and `train`), so that a sweep or a one-off change needs no edited copy of the file.
//!
//! ```text
//!   --set train.learning_rate=0.01   --set model.hidden=[512,256]   --set name=lr-0.01
//! ```
//!
//! `FIELD` is a dotted path of the spec's tables (`train.learning_rate`, `run.env.SEED`);
//! `VALUE` is read as a TOML value (`0.01`, `true`, `[512, 256]`, `"text"`, `{ min = 4, max = 4 }`),
//! and as plain text where it is not one (`lr-0.01`, `s3://bucket/data.csv`, `g5.xlarge`) or where
//! the field takes text (`name=2024`, `run.env.SEED=3`). A value replaces the field, a table
//! value the whole table, and `train.steps` replaces the file's `train.epochs` (and back). Each
//! override is checked on its own first, so an unknown field or a value of the wrong type names
//! the `--set` that carries it; the file's own mistakes keep their line numbers, and the result
//! is validated as a file is (every range, every error at once).
//! Pure: relative paths are made absolute by the caller ([`Override::resolve_relative`]).

use std::fmt;
use std::str::FromStr;

use super::{FieldError, SPEC_LEN_MAX_BYTES, SpecError, raw::RawJobSpec, uri::join_lexically};

/// `--set` overrides of one command at most.
pub const OVERRIDES_MAX: usize = 64;
/// Tables deep a field path may reach at most (`run.env.NAME` is three).
const PATH_DEPTH_MAX: usize = 4;

/// One `FIELD=VALUE` override.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// The field's path, split at its dots.
    path: Vec<String>,
    value: toml::Value,
    /// The value as given, for [`fmt::Display`] (which passes the override on unchanged).
    text: String,
}

/// Fields that name a local path: a relative one given with `--set` is relative to the
/// current folder (the shell's), not to the spec file's.
const PATH_FIELDS: [&str; 3] = ["data.train", "data.validation", "run.workdir"];

/// Fields of one table of which a spec holds either: setting one drops the file's other (a
/// job's length is epochs or steps).
const EITHER_OR: [(&str, &str, &str); 1] = [("train", "epochs", "steps")];

impl Override {
    /// The field's dotted path.
    pub fn field(&self) -> String {
        self.path.join(".")
    }

    /// This override with a relative local path in a path field (`data.train`,
    /// `data.validation`, `run.workdir`) joined to `base_dir` (an absolute folder, normally the
    /// current one) with `.` and `..` resolved by name ([`join_lexically`]).
    pub fn resolve_relative(&self, base_dir: &str) -> Override {
        let field = self.field();
        let toml::Value::String(text) = &self.value else { return self.clone() };
        let relative = match field.as_str() {
            "run.workdir" => !text.starts_with('/') && !super::run::is_packed_workdir(text),
            _ if PATH_FIELDS.contains(&field.as_str()) => {
                matches!(text.parse::<super::DataUri>(), Ok(super::DataUri::Relative(_)))
            }
            _ => false,
        };
        if !relative {
            return self.clone();
        }
        let joined = join_lexically(base_dir, text);
        Override { path: self.path.clone(), value: toml::Value::String(joined.clone()), text: joined }
    }

    /// This override as its field takes it: checked alone as a spec's fields (a wrong field or
    /// type is its own error), and a value read as another type is taken as its text where the
    /// field wants text (`name=2024`, `run.env.SEED=3`, `output.register_as=true`).
    fn fitted(&self) -> Result<Override, FieldError> {
        let error = match self.check() {
            Ok(()) => return Ok(self.clone()),
            Err(error) => error,
        };
        let as_text = Override { value: toml::Value::String(self.text.clone()), ..self.clone() };
        match self.value {
            toml::Value::String(_) => Err(error),
            _ => as_text.check().map(|()| as_text).map_err(|_| error),
        }
    }

    /// This override alone as a spec's fields: a wrong field or type is its own error.
    fn check(&self) -> Result<(), FieldError> {
        let mut alone = toml::Table::new();
        self.apply(&mut alone)?;
        toml::Value::Table(alone).try_into::<RawJobSpec>().map(drop).map_err(|e| self.error(e.message()))
    }

    /// Sets the field in `table`, making the tables on its path where they are missing.
    fn apply(&self, table: &mut toml::Table) -> Result<(), FieldError> {
        let (last, tables) = self.path.split_last().expect("a path has at least one name (FromStr)");
        let mut at = table;
        for (depth, name) in tables.iter().enumerate() {
            let entry = at.entry(name.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            at = match entry {
                toml::Value::Table(inner) => inner,
                other => {
                    let prefix = self.path[..=depth].join(".");
                    return Err(self
                        .error(&format!("`{prefix}` is a {}, not a table; set `{prefix}` itself", other.type_str())));
                }
            };
        }
        at.insert(last.clone(), self.value.clone());
        for (table, one, other) in EITHER_OR {
            if tables == [table] && (last == one || last == other) {
                at.remove(if last == one { other } else { one });
            }
        }
        Ok(())
    }

    fn error(&self, why: &str) -> FieldError {
        FieldError { field: self.field(), message: format!("--set {self}: {why}") }
    }
}

impl fmt::Display for Override {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.field(), self.text)
    }
}

impl FromStr for Override {
    type Err = String;

    fn from_str(given: &str) -> Result<Override, String> {
        if given.len() > SPEC_LEN_MAX_BYTES {
            return Err(format!("is {} bytes; an override may have at most {SPEC_LEN_MAX_BYTES}", given.len()));
        }
        let Some((field, text)) = given.split_once('=') else {
            return Err(format!("`{given}` is not FIELD=VALUE (e.g. train.learning_rate=0.01)"));
        };
        let path: Vec<String> = field.trim().split('.').map(str::to_string).collect();
        let bare =
            |name: &String| !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !path.iter().all(bare) || path.len() > PATH_DEPTH_MAX {
            return Err(format!(
                "`{}` is not a field: give its dotted path, at most {PATH_DEPTH_MAX} names of letters, \
                 digits, `_` and `-` (e.g. train.learning_rate)",
                field.trim()
            ));
        }
        let text = text.trim().to_string();
        Ok(Override { path, value: value_of(&text), text })
    }
}

/// `text` as a TOML value, or as a string where it is not one (or is a date, which no field
/// takes). One line only: more would be read as further keys.
fn value_of(text: &str) -> toml::Value {
    if text.contains(['\n', '\r']) {
        return toml::Value::String(text.to_string());
    }
    match toml::from_str::<toml::Table>(&format!("value = {text}")).map(|mut t| t.remove("value")) {
        Ok(Some(value)) if !matches!(value, toml::Value::Datetime(_)) => value,
        _ => toml::Value::String(text.to_string()),
    }
}

/// Parses the spec `text` with `overrides` applied (see the module's doc), unvalidated.
pub(super) fn apply_all(text: &str, overrides: &[Override]) -> Result<RawJobSpec, SpecError> {
    if overrides.len() > OVERRIDES_MAX {
        return Err(SpecError::Invalid(vec![FieldError {
            field: "--set".into(),
            message: format!("{} overrides given; at most {OVERRIDES_MAX} are taken", overrides.len()),
        }]));
    }
    // The file as written first: its syntax errors and unknown fields with their lines.
    toml::from_str::<RawJobSpec>(text).map_err(|e| SpecError::Syntax(e.to_string()))?;
    let mut table: toml::Table = toml::from_str(text).map_err(|e| SpecError::Syntax(e.to_string()))?;
    // A field the file holds as a value cannot be a table: said first (before the type error
    // the override alone would give).
    let errors: Vec<FieldError> = overrides
        .iter()
        .filter_map(|o| o.apply(&mut table.clone()).and_then(|()| o.fitted()).and_then(|o| o.apply(&mut table)).err())
        .collect();
    if !errors.is_empty() {
        return Err(SpecError::Invalid(errors));
    }
    let bytes = toml::to_string(&table).map(|t| t.len()).unwrap_or(usize::MAX);
    if bytes > SPEC_LEN_MAX_BYTES {
        return Err(SpecError::too_large("--set", format!("makes the spec {bytes} bytes")));
    }
    toml::Value::Table(table).try_into::<RawJobSpec>().map_err(|e| SpecError::Syntax(format!("with --set: {e}")))
}
