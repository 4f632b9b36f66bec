use super::*;
use clap::CommandFactory;

#[test]
fn cli_is_well_formed() {
    Cli::command().debug_assert();
}

#[test]
fn every_option_reads_an_environment_variable() {
    fn walk(cmd: &clap::Command, missing: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let builtin = matches!(arg.get_id().as_str(), "help" | "version");
            if !builtin && !arg.is_positional() && arg.get_env().is_none() {
                let id = arg.get_id().as_str();
                missing.push(format!("{} --{}", cmd.get_name(), id));
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, missing);
        }
    }
    let mut missing = Vec::new();
    walk(&Cli::command(), &mut missing);
    assert!(
        missing.is_empty(),
        "options without TASUKI_* env: {missing:?}"
    );
}

#[test]
fn an_invalid_callback_secret_or_range_stops_start_up() {
    let serve = |extra: &[&str]| {
        let mut args = vec!["tasuki", "serve"];
        args.extend_from_slice(extra);
        Cli::try_parse_from(args)
    };
    assert!(serve(&["--callback-secret", "nope"]).is_err());
    assert!(serve(&["--callback-secret", "whsec_!!"]).is_err());
    assert!(serve(&["--callback-allow", "10.0.0.0/33"]).is_err());
    let cli = serve(&[
        "--callback-secret",
        "whsec_c2Vjb25k,whsec_dGhpcmQ=",
        "--callback-allow",
        "127.0.0.1/32",
        "--callback-allow",
        "fd00::/8",
    ])
    .unwrap();
    let Command::Serve(args) = cli.command else {
        panic!("not serve")
    };
    assert_eq!(args.callbacks.secrets.len(), 2);
    assert_eq!(args.callbacks.allow.len(), 2);
    assert_eq!(args.callbacks.max_age, Duration::from_secs(24 * 3600));
}

#[test]
fn params_split_at_the_first_equals() {
    assert_eq!(param("a=b=c").unwrap(), ("a".into(), "b=c".into()));
    assert_eq!(param("a=").unwrap(), ("a".into(), "".into()));
    assert!(param("=x").is_err());
    assert!(param("novalue").is_err());
}

#[test]
fn amqp_urls_are_repeated_or_comma_separated_and_refused_without_their_password() {
    let worker = |extra: &[&str]| {
        let mut args = vec!["tasuki", "worker", "--worker-token", "t"];
        args.extend_from_slice(extra);
        Cli::try_parse_from(args).map(|cli| match cli.command {
            Command::Worker(w) => w.amqp_url,
            _ => panic!("not worker"),
        })
    };
    let a = "amqp://u:p@rabbit-a:5672/%2f";
    let b = "amqp://u:p@rabbit-b:5672/%2f";
    assert_eq!(worker(&["--amqp-url", a]).unwrap(), [a]);
    assert_eq!(worker(&["--amqp-url", a, "--amqp-url", b]).unwrap(), [a, b]);
    assert_eq!(
        worker(&["--amqp-url", &format!("{a}, {b}")]).unwrap(),
        [a, b]
    );
    // A worker needs one; serve runs without any.
    assert!(worker(&[]).is_err());
    let Command::Serve(serve) = Cli::try_parse_from(["tasuki", "serve"]).unwrap().command else {
        panic!("not serve")
    };
    assert!(serve.amqp_url.is_empty());
    for bad in [
        "rabbit-a:5672",
        "http://u:s3cret@rabbit-a/",
        "amqp://u:s3,cret@rabbit-a/",
    ] {
        let e = worker(&["--amqp-url", bad]).unwrap_err().to_string();
        assert!(
            !e.contains("s3cret") && !e.contains("cret@") && !e.contains("u:s3"),
            "{e}"
        );
    }
}

/// A refused database URL is named without its password, by clap too.
#[test]
fn a_refused_database_url_never_shows_its_password() {
    let err = Cli::try_parse_from([
        "tasuki",
        "serve",
        "--database-url",
        "mysql://root:hunter2@db/tasuki",
    ])
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("--database-url") && !err.contains("hunter2"),
        "{err}"
    );
    let err = Cli::try_parse_from([
        "tasuki",
        "store",
        "copy",
        "--from",
        "postgres://u:hunter2@/db",
        "--to",
        "sqlite://x.db",
    ])
    .unwrap_err()
    .to_string();
    assert!(!err.contains("hunter2"), "{err}");
}
