//! # warden-examples
//!
//! Examples of building on Warden (the `warden` crate):
//!
//! - [`billing`] — account handlers for a billing flow: charge → invoice → notify,
//!   each step a follow-up job enqueued by the previous one, with injected failures.
//!
//! Binaries:
//! - `warden-demo` — the README's run command: one node through a billing workload
//!   for hundreds of accounts, ending with a summary checked against the attempts table.
//! - `warden-node` — a production node with the billing handlers in 20 lines (the
//!   README's "A node in 20 lines" is this file, checked by a test).

pub mod billing;

#[cfg(test)]
mod tests {
    /// The README shows `src/bin/warden-node.rs` verbatim: the code users copy is the
    /// code that compiles here.
    #[test]
    fn the_readme_shows_the_node_example_verbatim() {
        let readme = include_str!("../../README.md");
        let example = include_str!("bin/warden-node.rs");
        assert!(
            readme.contains(example),
            "README.md must contain examples/src/bin/warden-node.rs verbatim (update the README's node section)"
        );
        assert!(example.lines().count() <= 24, "the node example grew past ~20 lines");
    }
}
