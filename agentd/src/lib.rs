//! agentd: the Cordon node runtime. The data plane (WireGuard, userspace stack, TUN) lands with its own issue.
