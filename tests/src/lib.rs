//! Shared harness for Cordon end-to-end tests.
