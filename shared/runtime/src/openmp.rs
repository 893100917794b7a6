//! How libtorch's OpenMP threads wait between parallel regions.
//!
//! GNU OpenMP (libtorch's `libgomp`) spins a waiting thread for 300,000 iterations before it
//! sleeps. That suits one process alone on its cores, but each thread that calls into libtorch
//! gets a team of its own: a model service training while it transcribes, or two processes
//! sharing the cores, then keep every core busy spinning. Measured on a 2-core machine, two
//! concurrent decodes took 4x as long as the same two one after the other; with a spin of
//! 10,000 they took 1.1x, with no spin 0.9x. A decode alone costs about 3% more with the
//! bounded spin (150 clips: 65.3 s vs 63.3 s), so only the model service, which trains and
//! transcribes at once by design, bounds it; the `asr` CLI keeps libgomp's default.
//!
//! libgomp reads its settings once, when it is loaded, before `main`; so a binary that wants
//! another default must set the variable and start itself again ([`bounded_spin_or_restart`]).

use std::ffi::OsString;

/// The spin the binaries use when the user set none: about 10,000 iterations (tens of
/// microseconds) covers the gaps between a decoder step's small operations, then threads sleep.
pub const DEFAULT_SPIN_COUNT: &str = "10000";

/// The variables through which a user chooses the waiting policy; if any is set, it is theirs.
const USER_SETTINGS: [&str; 2] = ["OMP_WAIT_POLICY", "GOMP_SPINCOUNT"];

/// Marks a process started again by [`bounded_spin_or_restart`], so it happens at most once.
const RESTARTED: &str = "ASR_OPENMP_RESTARTED";

/// What [`bounded_spin_or_restart`] should do for this environment.
#[derive(Debug, PartialEq, Eq)]
pub enum SpinDecision {
    /// The user chose a policy, or this process already runs with ours.
    Keep,
    /// Start again with `GOMP_SPINCOUNT` set to this value.
    Restart(&'static str),
}

/// The decision for an environment given as a lookup (testable without touching the process's).
pub fn decide(lookup: impl Fn(&str) -> Option<OsString>) -> SpinDecision {
    let chosen = USER_SETTINGS.iter().any(|name| lookup(name).is_some());
    if chosen || lookup(RESTARTED).is_some() {
        SpinDecision::Keep
    } else {
        SpinDecision::Restart(DEFAULT_SPIN_COUNT)
    }
}

/// Call first in `main` of a binary that runs libtorch: unless the user set `OMP_WAIT_POLICY`
/// or `GOMP_SPINCOUNT`, replaces this process with itself (same pid, arguments and standard
/// streams) with `GOMP_SPINCOUNT` bounded. Returns if it need not, or if the restart failed
/// (the error is reported on stderr, and the process goes on with libgomp's default).
pub fn bounded_spin_or_restart() {
    let SpinDecision::Restart(count) = decide(|name| std::env::var_os(name)) else {
        return;
    };
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let error = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env("GOMP_SPINCOUNT", count)
            .env(RESTARTED, "1")
            .exec();
        eprintln!("could not restart with GOMP_SPINCOUNT={count}: {error}; going on with OpenMP's default spin");
    }
    #[cfg(not(unix))]
    let _ = count;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn decide_with(vars: &[(&str, &str)]) -> SpinDecision {
        let map: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        decide(|name| map.get(name).cloned())
    }

    #[test]
    fn the_users_choice_wins_and_the_restart_happens_once() {
        assert_eq!(decide_with(&[]), SpinDecision::Restart(DEFAULT_SPIN_COUNT));
        assert_eq!(
            decide_with(&[("OMP_WAIT_POLICY", "active")]),
            SpinDecision::Keep
        );
        assert_eq!(decide_with(&[("GOMP_SPINCOUNT", "0")]), SpinDecision::Keep);
        assert_eq!(decide_with(&[(RESTARTED, "1")]), SpinDecision::Keep);
        assert_eq!(
            decide_with(&[("OMP_NUM_THREADS", "2")]),
            SpinDecision::Restart(DEFAULT_SPIN_COUNT)
        );
    }
}
