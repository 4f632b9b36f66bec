//! OpenAPI schemas written by hand for the wire types whose serde form a derive cannot
//! see: the string codes read `from = "String"` (statuses, reasons, error codes), which
//! keep unknown text when read but are only ever written as one of the known words.

use std::borrow::Cow;

use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};

use super::{ErrorCodeV1, ReasonCodeV1, RunStatusV1};
use crate::domain::run::{ReasonCode, RunStatus};

/// A string that is one of `values` (what this server writes).
fn string_enum<'a>(values: impl IntoIterator<Item = &'a str>, about: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values.into_iter().map(str::to_owned)))
        .description(Some(about))
        .into()
}

impl utoipa::PartialSchema for RunStatusV1 {
    fn schema() -> RefOr<Schema> {
        string_enum(
            RunStatus::ALL.iter().map(|s| s.as_str()),
            "A run's or an attempt's status. Clients should keep text they do not know.",
        )
    }
}

impl utoipa::ToSchema for RunStatusV1 {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("RunStatusV1")
    }
}

impl utoipa::PartialSchema for ReasonCodeV1 {
    fn schema() -> RefOr<Schema> {
        string_enum(
            ReasonCode::ALL.iter().map(|c| c.as_str()),
            "Why a run or an attempt did not succeed. Clients should keep text they do not know.",
        )
    }
}

impl utoipa::ToSchema for ReasonCodeV1 {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ReasonCodeV1")
    }
}

impl utoipa::PartialSchema for ErrorCodeV1 {
    fn schema() -> RefOr<Schema> {
        string_enum(
            ErrorCodeV1::KNOWN.iter().map(ErrorCodeV1::as_str),
            "An error's stable code; clients branch on it. Clients should keep codes they \
             do not know.",
        )
    }
}

impl utoipa::ToSchema for ErrorCodeV1 {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ErrorCodeV1")
    }
}
