//! Unit tests of derivations.
