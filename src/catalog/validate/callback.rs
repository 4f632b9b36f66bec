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

#[cfg(test)]
mod tests {
    use crate::catalog::testing::*;

    #[test]
    fn a_callback_url_is_read_and_bad_ones_name_file_line_and_field() {
        let spec =
            parse("image = \"a\"\n[callback]\nurl = \"https://hooks.example.com/x\"\n").unwrap();
        assert_eq!(
            spec.callback.map(|c| c.url).as_deref(),
            Some("https://hooks.example.com/x")
        );
        assert!(parse("image = \"a\"\n").unwrap().callback.is_none());
        assert_eq!(
            errors("image = \"a\"\n[callback]\nurl = \"ftp://example.com/\"\n"),
            [
                "jobs/hello.toml:3: callback.url: only http and https callbacks are allowed, not \"ftp\""
            ]
        );
        let e = one_error("image = \"a\"\n[callback]\nurl = \"not a url\"\n");
        assert_eq!(
            (e.line, e.field.as_deref()),
            (Some(3), Some("callback.url"))
        );
        // A missing url or an unknown key is a file format error.
        assert!(parse("image = \"a\"\n[callback]\n").is_err());
        assert!(parse("image = \"a\"\n[callback]\nurl = \"http://x/\"\nsecret = \"s\"\n").is_err());
    }
}
