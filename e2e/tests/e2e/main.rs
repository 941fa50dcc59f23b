//! The end-to-end tests, one binary: the harness itself, the kit's parts, the operators, the
//! charts. Run with `make test-e2e` (which starts the shared cluster once and stops it after).

mod charts;
mod grayapp;
mod harness;
mod kit;
mod real_node;
mod scheduler_extender;
