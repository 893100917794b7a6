//! Which scope each FeatureService method needs when the service checks bearer tokens.

use asr_runtime::auth::{AccessPolicy, Requirement, Scope};

pub const SERVICE: &str = "asr.v1.FeatureService";

pub fn policy() -> AccessPolicy {
    use Requirement::{Authenticated, Scope as Needs};
    AccessPolicy::new(
        SERVICE,
        &[
            ("Extract", Needs(Scope::Transcribe)),
            ("Transcribe", Needs(Scope::Transcribe)),
            ("Ingest", Needs(Scope::Train)),
            ("GetInfo", Authenticated),
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
