//! fedpeft wire format (being built).
#![no_std]
extern crate alloc;
