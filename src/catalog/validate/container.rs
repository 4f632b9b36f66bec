//! `workdir`, `user` and `network`: how the container is set up around the command.
//! The network may be any Docker network but the host's or another container's.

use super::Ctx;
use crate::catalog::file::JobFile;
use crate::domain::job::check_network;

const DEFAULT_NETWORK: &str = "bridge";

#[derive(Debug, PartialEq)]
pub(super) struct Container {
    pub(super) workdir: Option<String>,
    pub(super) user: Option<String>,
    pub(super) network: String,
}

pub(super) fn container(ctx: &mut Ctx<'_>, raw: &JobFile) -> Container {
    let workdir = raw.workdir.as_ref().map(|w| {
        ctx.no_refs(w, "workdir");
        if !w.get_ref().starts_with('/') {
            ctx.at(
                &w.span(),
                "workdir",
                format!("{:?} must be an absolute path", w.get_ref()),
            );
        }
        w.get_ref().clone()
    });
    let user = raw.user.as_ref().map(|u| {
        ctx.no_refs(u, "user");
        ctx.non_blank_token(u, "user");
        u.get_ref().clone()
    });
    let network = match &raw.network {
        None => DEFAULT_NETWORK.to_owned(),
        Some(n) => {
            ctx.no_refs(n, "network");
            if ctx.non_blank_token(n, "network")
                && let Err(refusal) = check_network(n.get_ref())
            {
                ctx.at(&n.span(), "network", refusal.0);
            }
            n.get_ref().clone()
        }
    };
    Container {
        workdir,
        user,
        network,
    }
}

#[cfg(test)]
mod tests {
    use crate::catalog::testing::*;

    #[test]
    fn container_settings() {
        let s =
            parse("image = \"a\"\nworkdir = \"/w\"\nuser = \"app\"\nnetwork = \"none\"\n").unwrap();
        assert_eq!(s.workdir.as_deref(), Some("/w"));
        assert_eq!(s.user.as_deref(), Some("app"));
        assert_eq!(s.network, "none");

        let e = one_error("image = \"a\"\nworkdir = \"tmp\"\n");
        assert_eq!(
            e.to_string(),
            "jobs/hello.toml:2: workdir: \"tmp\" must be an absolute path"
        );
        let e = one_error("image = \"a\"\nuser = \"a b\"\n");
        assert_eq!(e.field.as_deref(), Some("user"));
        assert!(e.message.contains("whitespace"), "{e}");
        let e = one_error("image = \"a\"\n\nnetwork = \"{{params.n}}\"\n[params.n]\n");
        assert_eq!(e.line, Some(3));
        assert_eq!(e.field.as_deref(), Some("network"));
        assert!(e.message.contains("only substituted"), "{e}");
        let e = one_error("image = \"a\"\nnetwork = \"host\"\n");
        assert_eq!(
            e.to_string(),
            "jobs/hello.toml:2: network: \"host\" is never allowed (the container would share \
             the host's network)"
        );
    }
}
