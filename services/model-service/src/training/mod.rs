//! LoRA training jobs: [`spec`] validates a request, [`jobs`] persists and queues jobs,
//! [`runner`] trains them one at a time, [`suspend`] stops it with a checkpoint on shutdown.

mod inputs;
pub mod jobs;
pub mod runner;
pub mod spec;
pub mod suspend;

pub use inputs::check_inputs;
pub use jobs::Jobs;
pub use runner::Runner;
pub use spec::JobSpec;
pub use suspend::SuspendHandle;
