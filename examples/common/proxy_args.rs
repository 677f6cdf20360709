//! The flags of `examples/reverse_proxy.rs` (its module docs describe them), read into
//! [`Args`]. Kept apart so the example's file stays about the proxy.

use std::net::SocketAddr;

use super::flags::Flags;

/// What the command line asked for.
pub struct Args {
    pub listen: SocketAddr,
    pub backends: Vec<String>,
    pub serve: bool,
    pub threads: Option<usize>,
    pub retry: bool,
    pub direct: bool,
    pub workers: Option<usize>,
    pub take_over: Option<usize>,
    /// `--handoff PATH`: inherit the listening sockets from the instance serving PATH (if
    /// one does), then serve PATH for the next restart.
    pub handoff: Option<std::path::PathBuf>,
    pub tls: Option<(String, String)>,
    pub balance: bool,
    pub gateway: Option<GatewayConfig>,
}

/// `--gateway`'s settings (see the module docs).
// Without the gateway's features only the key is read (to print it before the error).
#[cfg_attr(
    not(all(feature = "metrics", feature = "auth", feature = "rate-limit")),
    allow(dead_code)
)]
pub struct GatewayConfig {
    pub api_key: String,
    /// Made here because none was given: printed at start-up.
    pub generated_key: bool,
    pub rate_limit: u32,
    pub bulkhead: usize,
}

/// Reads the process's flags; an unknown or incomplete one is an error.
pub fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: "127.0.0.1:0".parse().map_err(|_| "bad default")?,
        backends: Vec::new(),
        serve: false,
        threads: None,
        retry: true,
        direct: false,
        workers: None,
        take_over: None,
        handoff: None,
        tls: None,
        balance: true,
        gateway: None,
    };
    let (mut cert, mut key) = (
        std::env::var("TLS_CERT").ok(),
        std::env::var("TLS_KEY").ok(),
    );
    let (mut gateway, mut api_key, mut rate_limit, mut bulkhead) = (false, None, None, None);
    let mut flags = Flags::from_env();
    while let Some(a) = flags.next_flag() {
        match a.as_str() {
            "--listen" => args.listen = flags.parse(&a)?,
            "--backends" => {
                args.backends = flags
                    .value(&a)?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect();
            }
            "--tls-cert" => cert = Some(flags.value(&a)?),
            "--tls-key" => key = Some(flags.value(&a)?),
            "--serve" => args.serve = true,
            "--no-retry" => args.retry = false,
            "--direct" => args.direct = true,
            "--no-balance" => args.balance = false,
            "--threads" => args.threads = Some(flags.parse(&a)?),
            "--workers" => args.workers = Some(flags.parse(&a)?),
            "--take-over" => args.take_over = Some(flags.parse(&a)?),
            "--handoff" => args.handoff = Some(flags.value(&a)?.into()),
            "--gateway" => gateway = true,
            "--api-key" => api_key = Some(flags.value(&a)?),
            "--rate-limit" => rate_limit = Some(flags.parse(&a)?),
            "--bulkhead" => bulkhead = Some(flags.parse(&a)?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    args.tls = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => return Err("--tls-cert and --tls-key go together".into()),
    };
    if args.handoff.is_some() && args.take_over.is_some() {
        return Err("--handoff and --take-over are two ways to restart: use one".into());
    }
    if args.handoff.is_some() && !cfg!(target_os = "linux") {
        return Err("--handoff needs Linux".into());
    }
    if args.tls.is_some() && !args.serve {
        return Err("--tls-cert/--tls-key need --serve".into());
    }
    if gateway {
        if !args.serve {
            return Err("--gateway needs --serve".into());
        }
        let api_key = api_key.or_else(|| std::env::var("GATEWAY_API_KEY").ok());
        args.gateway = Some(GatewayConfig {
            generated_key: api_key.is_none(),
            // 128 random bits: a key nobody can guess when none was configured.
            api_key: api_key.unwrap_or_else(|| format!("{:032x}", rand::random::<u128>())),
            rate_limit: rate_limit.unwrap_or(1_000_000),
            bulkhead: bulkhead.unwrap_or(1024),
        });
    } else if api_key.is_some() || rate_limit.is_some() || bulkhead.is_some() {
        return Err("--api-key/--rate-limit/--bulkhead need --gateway".into());
    }
    Ok(args)
}
