//! LoRA training jobs: [`spec`] validates a request, [`jobs`] persists and queues jobs,
//! [`runner`] trains them one at a time.

pub mod jobs;
pub mod runner;
pub mod spec;

pub use jobs::Jobs;
pub use runner::Runner;
pub use spec::JobSpec;
