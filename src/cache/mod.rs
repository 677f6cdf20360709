//! Edge cache (todo).
