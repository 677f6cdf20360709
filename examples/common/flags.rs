//! Command-line flags of the serving examples (`reverse_proxy`, `cache_server`): a tiny
//! hand-written reader, so the examples need no argument-parsing dependency, and one place
//! that words "needs a value" and "cannot parse" errors the same way.
//!
//! Included by each example with `#[path = "common/flags.rs"] mod flags;`.

use std::fmt::Display;
use std::str::FromStr;

/// The process's arguments after the program name, read flag by flag.
pub struct Flags(std::iter::Skip<std::env::Args>);

impl Flags {
    /// The arguments of this process.
    pub fn from_env() -> Self {
        Flags(std::env::args().skip(1))
    }

    /// The next flag (`--listen`, ...), `None` at the end.
    pub fn next_flag(&mut self) -> Option<String> {
        self.0.next()
    }

    /// The value following `flag`.
    pub fn value(&mut self, flag: &str) -> Result<String, String> {
        self.0.next().ok_or_else(|| format!("{flag} needs a value"))
    }

    /// The value following `flag`, parsed: `--workers x: invalid digit found in string`.
    pub fn parse<T>(&mut self, flag: &str) -> Result<T, String>
    where
        T: FromStr,
        T::Err: Display,
    {
        let v = self.value(flag)?;
        v.parse().map_err(|e| format!("{flag} {v}: {e}"))
    }
}
