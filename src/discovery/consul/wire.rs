//! The JSON bodies of Consul's agent and health APIs, and how durations and check ids are
//! spelled on the wire.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::super::Instance;

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct RegisterBody<'a> {
    #[serde(rename = "ID")]
    pub(super) id: &'a str,
    pub(super) name: &'a str,
    pub(super) tags: &'a [String],
    pub(super) address: &'a str,
    pub(super) port: u16,
    pub(super) meta: BTreeMap<&'a str, &'a str>,
    pub(super) check: CheckBody,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct CheckBody {
    #[serde(rename = "CheckID")]
    pub(super) check_id: String,
    pub(super) name: String,
    #[serde(rename = "TTL")]
    pub(super) ttl: String,
    pub(super) status: &'static str,
    pub(super) deregister_critical_service_after: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct HealthEntry {
    #[serde(default)]
    pub(super) node: Option<NodeEntry>,
    pub(super) service: ServiceEntry,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct NodeEntry {
    #[serde(default)]
    pub(super) address: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct ServiceEntry {
    #[serde(rename = "ID")]
    pub(super) id: String,
    pub(super) service: String,
    #[serde(default)]
    pub(super) tags: Option<Vec<String>>,
    #[serde(default)]
    pub(super) address: String,
    pub(super) port: u16,
    #[serde(default)]
    pub(super) meta: Option<BTreeMap<String, String>>,
}

/// Consul durations: whole milliseconds, at least 1 ms.
pub(super) fn duration(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

pub(super) fn check_id(instance: &Instance) -> String {
    format!("service:{}", instance.id)
}
