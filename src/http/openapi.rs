//! The public API's OpenAPI 3.1 document, served at `/v1/openapi.json`. It is built from
//! the same `OpenApiRouter`s that route requests (each handler's `#[utoipa::path]`), so a
//! route cannot exist without its entry; what every operation shares (the token's 401
//! and 403, the rate limit's 429, the store's 503, a body's 408 and 413) is added here
//! once, from the same rules `auth.rs` and `limits.rs` apply. The worker protocol is not
//! in it (see ARCHITECTURE.md).

use std::sync::LazyLock;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::Operation;
use utoipa::openapi::schema::{
    AdditionalProperties, ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi as _, PartialSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use crate::domain::callback::EVENTS;
use crate::domain::run::RunStatus;
use crate::protocol::api::ErrorBodyV1;

/// The security scheme's name in the document (also spelled in `security(..)`).
const BEARER: &str = "bearer";

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "tasuki",
        description = "Run batch jobs as one-shot containers. Every error answer is an \
                       `ErrorBodyV1`; clients branch on its `code`."
    ),
    modifiers(&BearerScheme),
    security(("bearer" = [])),
    components(schemas(ErrorBodyV1)),
    tags(
        (name = "runs", description = "Start, read, cancel and retry runs"),
        (name = "logs", description = "A run's output"),
        (name = "jobs", description = "The job catalog"),
        (name = "schedules", description = "Schedules at run time"),
        (name = "hooks", description = "Signed webhook deliveries (no token)"),
        (name = "health", description = "Liveness and readiness"),
        (name = "meta", description = "This document"),
    )
)]
struct ApiDoc;

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API token (`tasuki token create`, `[[tokens]]` in the server \
                         config). A server without API tokens takes none.",
                    ))
                    .build(),
            ),
        );
    }
}

/// The router every public route hangs off: the document's info, security and tags.
pub(super) fn base() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
}

pub(super) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(openapi_json))
}

/// The whole document: the routers' operations and what they all share.
pub fn document() -> OpenApi {
    let mut doc = super::public_api().into_openapi();
    add_shared_responses(&mut doc);
    doc
}

static DOCUMENT: LazyLock<Vec<u8>> = LazyLock::new(|| {
    // Serialising a tree of strings and maps does not fail; an empty body would show.
    serde_json::to_vec(&document()).unwrap_or_default()
});

/// `GET /v1/openapi.json`. Open, like `/healthz`: it describes the API and holds no data.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "meta",
    operation_id = "openapi",
    security(()),
    responses((status = 200, description = "This document (OpenAPI 3.1)",
        content_type = "application/json", body = Object)),
)]
async fn openapi_json() -> Response {
    let mut response = DOCUMENT.as_slice().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A run parameter's value: a string, number or boolean (it reaches the job as text).
pub(super) fn param_values() -> Schema {
    let value = OneOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::String))
        .item(ObjectBuilder::new().schema_type(Type::Number))
        .item(ObjectBuilder::new().schema_type(Type::Boolean));
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .additional_properties(Some(AdditionalProperties::RefOr(
            Schema::OneOf(value.build()).into(),
        )))
        .description(Some(
            "The job's parameters by name: strings, numbers or booleans",
        ))
        .into()
}

/// `GET /v1/runs?status=`: a status, or empty for any.
pub(super) fn status_filter() -> Schema {
    let statuses = RunStatus::ALL.iter().map(|s| s.as_str()).chain([""]);
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(statuses))
        .into()
}

/// A callback's `events`: the known event names (`finished`); absent means all.
pub(super) fn callback_events() -> Schema {
    let event = ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(EVENTS));
    let array = ArrayBuilder::new().items(event).build();
    OneOfBuilder::new()
        .item(array)
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .into()
}

fn error_response(description: &str, headers: &[(&str, &str)]) -> RefOr<utoipa::openapi::Response> {
    let mut response = ResponseBuilder::new().description(description).content(
        "application/json",
        ContentBuilder::new()
            .schema(Some(ErrorBodyV1::schema_ref()))
            .build(),
    );
    for (name, about) in headers {
        response = response.header(
            *name,
            HeaderBuilder::new()
                .schema(String::schema())
                .description(Some(*about))
                .build(),
        );
    }
    response.build().into()
}

trait SchemaRef {
    fn schema_ref() -> RefOr<Schema>;
}

impl<T: utoipa::ToSchema> SchemaRef for T {
    fn schema_ref() -> RefOr<Schema> {
        RefOr::Ref(utoipa::openapi::Ref::from_schema_name(T::name()))
    }
}

/// Is this operation open (`security: [{}]`), like `/healthz` and the webhooks?
fn is_open(op: &Operation) -> bool {
    op.security
        .as_ref()
        .is_some_and(|s| s.len() == 1 && s[0] == Default::default())
}

/// The answers every operation can give, whatever its handler does, from the layers in
/// `http::router`: authentication (401, 403), the per-token rate and holds (429), the
/// request body's size and deadline (413, 408), and the store (503).
fn add_shared_responses(doc: &mut OpenApi) {
    for (path, item) in doc.paths.paths.iter_mut() {
        let ops = [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.delete,
            &mut item.patch,
        ];
        for op in ops.into_iter().flatten() {
            let open = is_open(op);
            let has_body = op.request_body.is_some();
            let responses = &mut op.responses.responses;
            let mut add = |status: &str, response: RefOr<utoipa::openapi::Response>| {
                responses.entry(status.to_owned()).or_insert(response);
            };
            if !open {
                add(
                    "401",
                    error_response(
                        "No bearer token, or one the server does not know (`unauthorized`)",
                        &[("WWW-Authenticate", "The Bearer challenge (RFC 6750)")],
                    ),
                );
                add(
                    "403",
                    error_response(
                        "A worker token, or a token whose scopes do not allow this on a job \
                         it may read (`forbidden`)",
                        &[],
                    ),
                );
            }
            if !super::limits::exempt(path) {
                add(
                    "429",
                    error_response(
                        "Over the token's request rate (`rate_limited`) or its holds open at \
                         once (`too_many_holds`)",
                        &[(
                            "Retry-After",
                            "Seconds until a request would pass (rate only)",
                        )],
                    ),
                );
            }
            if has_body {
                add(
                    "408",
                    error_response(
                        "The body did not arrive within `limits.body_timeout` (`request_timeout`)",
                        &[],
                    ),
                );
                add(
                    "413",
                    error_response("The body is over 1 MiB (`body_too_large`)", &[]),
                );
            }
            // These read no store (the job list is the catalog in memory).
            let stateless = ["/healthz", "/readyz", "/v1/openapi.json", "/v1/jobs"];
            if !stateless.contains(&path.as_str()) {
                add(
                    "503",
                    error_response("The store is unavailable (`unavailable`)", &[]),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
