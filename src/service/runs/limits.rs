//! How many parameters a run request may carry and how large each may be: checked
//! before anything else in `accept_with`, the one door of the HTTP API, webhooks and the
//! request queue, so all three obey the same `[limits]`.

use std::collections::BTreeMap;

/// `max_params` and `max_param_bytes` of the server's `[limits]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamLimits {
    pub max_params: usize,
    /// Bytes of one parameter's value (and of its name).
    pub max_param_bytes: usize,
}

impl Default for ParamLimits {
    /// The config file's defaults.
    fn default() -> Self {
        ParamLimits {
            max_params: 64,
            max_param_bytes: 8 * 1024,
        }
    }
}

/// A request over a parameter limit. Names are cut short in the message, since the
/// caller chose them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamLimitError {
    #[error("{count} parameters given; at most {max} are allowed (limits.max_params)")]
    TooMany { count: usize, max: usize },
    #[error(
        "parameter `{name}` is {bytes} bytes long; at most {max} are allowed (limits.max_param_bytes)"
    )]
    ValueTooLarge {
        name: String,
        bytes: usize,
        max: usize,
    },
    #[error(
        "parameter name `{name}` is {bytes} bytes long; at most {max} are allowed (limits.max_param_bytes)"
    )]
    NameTooLarge {
        name: String,
        bytes: usize,
        max: usize,
    },
}

/// How much of a caller's parameter name goes into an error message.
const NAME_SHOWN: usize = 64;

fn shown(name: &str) -> String {
    if name.len() <= NAME_SHOWN {
        return name.to_owned();
    }
    let mut end = NAME_SHOWN;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &name[..end])
}

impl ParamLimits {
    /// The first limit `params` is over: the count first, then each name and value in
    /// name order.
    pub fn check(&self, params: &BTreeMap<String, String>) -> Result<(), ParamLimitError> {
        if params.len() > self.max_params {
            return Err(ParamLimitError::TooMany {
                count: params.len(),
                max: self.max_params,
            });
        }
        for (name, value) in params {
            if name.len() > self.max_param_bytes {
                return Err(ParamLimitError::NameTooLarge {
                    name: shown(name),
                    bytes: name.len(),
                    max: self.max_param_bytes,
                });
            }
            if value.len() > self.max_param_bytes {
                return Err(ParamLimitError::ValueTooLarge {
                    name: shown(name),
                    bytes: value.len(),
                    max: self.max_param_bytes,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const SMALL: ParamLimits = ParamLimits {
        max_params: 2,
        max_param_bytes: 4,
    };

    #[test]
    fn within_the_limits_passes() {
        assert_eq!(SMALL.check(&params(&[])), Ok(()));
        assert_eq!(SMALL.check(&params(&[("a", "1234"), ("bcde", "")])), Ok(()));
    }

    #[test]
    fn too_many_names_the_count_and_the_limit() {
        let e = SMALL
            .check(&params(&[("a", ""), ("b", ""), ("c", "")]))
            .unwrap_err();
        assert_eq!(e, ParamLimitError::TooMany { count: 3, max: 2 });
        assert_eq!(
            e.to_string(),
            "3 parameters given; at most 2 are allowed (limits.max_params)"
        );
    }

    #[test]
    fn a_large_value_names_the_param_and_the_limit() {
        let e = SMALL.check(&params(&[("a", "12345")])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "parameter `a` is 5 bytes long; at most 4 are allowed (limits.max_param_bytes)"
        );
    }

    #[test]
    fn a_long_name_is_refused_and_shown_cut_short() {
        let limits = ParamLimits {
            max_params: 1,
            max_param_bytes: 70,
        };
        let name = "é".repeat(40);
        let e = limits.check(&params(&[(&name, "")])).unwrap_err();
        let ParamLimitError::NameTooLarge {
            name: shown, bytes, ..
        } = &e
        else {
            panic!("{e:?}")
        };
        assert_eq!(*bytes, 80);
        assert!(shown.ends_with('…') && shown.len() < 70, "{shown}");
    }
}
