//! The `[callback]` table: where the job's runs announce their end.

use super::Ctx;
use crate::catalog::file::CallbackFile;
use crate::domain::callback::CallbackTarget;
use crate::domain::callback::guard::check_scheme;

/// `url` must be an http(s) URL. Whether its address may be called is decided when a
/// run is requested and at each delivery (the address can change; the allow-list is
/// the server's).
pub(super) fn callback(ctx: &mut Ctx<'_>, raw: &CallbackFile) -> Option<CallbackTarget> {
    let url = &raw.url;
    ctx.no_refs(url, "callback.url");
    let parsed = match reqwest::Url::parse(url.get_ref()) {
        Ok(parsed) => parsed,
        Err(e) => {
            ctx.at(&url.span(), "callback.url", format!("not a URL: {e}"));
            return None;
        }
    };
    if let Err(refused) = check_scheme(parsed.scheme()) {
        ctx.at(&url.span(), "callback.url", refused.to_string());
        return None;
    }
    Some(CallbackTarget {
        url: url.get_ref().clone(),
    })
}
