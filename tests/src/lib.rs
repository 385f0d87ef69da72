//! End-to-end tests for fedpeft live in `tests/tests/` (being built).
