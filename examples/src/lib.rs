//! # warden-examples
//!
//! Examples of building on Warden (the `warden` crate):
//!
//! - [`billing`] — account handlers for a billing flow: charge → invoice → notify,
//!   each step a follow-up job enqueued by the previous one, with injected failures.
//! - [`long_import`] — a long-running job: heartbeats with progress, a checkpointed
//!   cursor it resumes from, stopping on a handoff (the README's long job).
//!
//! Binaries:
//! - `warden-demo` — the README's run command: one node through a billing workload
//!   for hundreds of accounts, ending with a summary checked against the attempts table.
//! - `warden-node` — a production node with the billing handlers in 20 lines (the
//!   README's "A node in 20 lines" is this file, checked by a test).

pub mod billing;
pub mod long_import;

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

    /// The README's long job is `long_import.rs`'s `impl Handler`, verbatim.
    #[test]
    fn the_readme_shows_the_long_job_verbatim() {
        let readme = include_str!("../../README.md");
        let source = include_str!("long_import.rs");
        let start = source.find("#[async_trait]\nimpl Handler for LongImport").expect("the impl");
        let end = start + source[start..].find("\n}\n").expect("its end") + 3;
        assert!(
            readme.contains(&source[start..end]),
            "README.md must contain the `impl Handler for LongImport` of examples/src/long_import.rs verbatim"
        );
    }
}
