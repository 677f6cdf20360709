//! Consul (placeholder)
