//! Shared by the relay tests: a fake ModelService and the harness around the feature service.
#![allow(dead_code)] // each test binary uses part of it

pub mod fake_model;
pub mod harness;
pub mod wire_watch;
