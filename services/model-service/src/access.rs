//! Which scope each ModelService method needs when the service checks bearer tokens.

use asr_runtime::auth::{AccessPolicy, Requirement, Scope};

pub const SERVICE: &str = "asr.v1.ModelService";

pub fn policy() -> AccessPolicy {
    use Requirement::{Authenticated, Scope as Needs};
    AccessPolicy::new(
        SERVICE,
        &[
            ("Transcribe", Needs(Scope::Transcribe)),
            ("GetModelInfo", Authenticated),
            // Users choose adapters by name, so any caller may see which exist.
            ("ListAdapters", Authenticated),
            ("GetAdapter", Authenticated),
            ("IngestExamples", Needs(Scope::Train)),
            ("ListDatasets", Needs(Scope::Train)),
            ("GetDataset", Needs(Scope::Train)),
            ("DeleteDataset", Needs(Scope::Train)),
            ("StartTraining", Needs(Scope::Train)),
            ("WatchTraining", Needs(Scope::Train)),
            ("ListTrainingJobs", Needs(Scope::Train)),
            ("GetTrainingJob", Needs(Scope::Train)),
            ("CancelTraining", Needs(Scope::Train)),
            ("LoadAdapter", Needs(Scope::Admin)),
            ("UnloadAdapter", Needs(Scope::Admin)),
            ("DeleteAdapter", Needs(Scope::Admin)),
            ("MergeAdapters", Needs(Scope::Admin)),
        ],
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_method_has_a_stated_requirement() {
        assert_eq!(
            super::policy().unlisted_methods(super::SERVICE),
            Vec::<String>::new()
        );
    }
}
