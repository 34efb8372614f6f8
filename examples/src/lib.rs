//! Orchestrator examples for Cordon; see `examples/`.
