//! The checker must be able to fail, and the guard must matter. With self-fencing
//! switched off (a test-only mutant) the fault schedules must show two leaders acting
//! at once within a bounded number of seeds; the guarded store must still refuse every
//! stale write then (the guard does not rely on the client's fencing); and with the
//! guard switched off as well, the checker must see the counter go wrong. Its own test
//! binary, and one test, so the global switch touches nothing else.

mod schedule;

use ha_core::testing::history::Record;

const SEEDS: u64 = 300;

#[test]
fn without_self_fencing_the_checker_finds_two_leaders_and_only_the_guard_saves_the_store() {
    ha_core::testing::mutant::disable_self_fencing(true);
    let mut two_leaders = None;
    let mut stale_rejected = 0;
    for seed in 0..SEEDS {
        let history = schedule::run(seed);
        let report = schedule::check(&history);
        if let Some(v) = report.violations.iter().find(|v| v.clause == 3) {
            ha_core::testing::mutant::disable_self_fencing(false);
            panic!(
                "seed {seed}: the guarded store let a stale write through: {}\n{}",
                v.what,
                history.timeline()
            );
        }
        stale_rejected += history
            .records()
            .iter()
            .filter(|r| {
                matches!(
                    r,
                    Record::Write {
                        accepted: false,
                        ..
                    }
                )
            })
            .count();
        if two_leaders.is_none() {
            if let Some(v) = report.violations.iter().find(|v| v.clause == 1) {
                two_leaders = Some((seed, v.what.clone()));
            }
        }
    }
    let mut counter_broken = None;
    for seed in 0..SEEDS {
        let report = schedule::check(&schedule::run_with(seed, true));
        if let Some(v) = report.violations.iter().find(|v| v.clause == 3) {
            counter_broken = Some((seed, v.what.clone()));
            break;
        }
    }
    ha_core::testing::mutant::disable_self_fencing(false);
    let (seed, what) = two_leaders.unwrap_or_else(|| {
        panic!(
            "{SEEDS} schedules without self-fencing and the checker saw nothing: it proves nothing"
        )
    });
    eprintln!("mutant caught at seed {seed}: {what}");
    assert!(
        stale_rejected > 0,
        "no stale write was ever attempted, so the guard was never tested"
    );
    eprintln!("the guard refused {stale_rejected} stale writes in {SEEDS} schedules");
    let (seed, what) = counter_broken.unwrap_or_else(|| {
        panic!("{SEEDS} schedules with an unguarded store and the checker saw nothing")
    });
    eprintln!("unguarded store caught at seed {seed}: {what}");
}
