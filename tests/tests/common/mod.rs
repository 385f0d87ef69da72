//! Helpers shared by some of the end-to-end tests (each test file that uses them says
//! `mod common;`).
#![allow(dead_code)]

pub mod exported;
