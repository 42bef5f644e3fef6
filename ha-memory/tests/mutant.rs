//! The checker must be able to fail: with self-fencing switched off (a test-only mutant),
//! the fault schedules must produce a history with two leaders acting at once within a
//! bounded number of seeds. Its own test binary, so the switch touches no other test.

mod schedule;

#[test]
fn without_self_fencing_the_checker_finds_two_leaders() {
    ha_core::testing::mutant::disable_self_fencing(true);
    let mut found = None;
    for seed in 0..300 {
        let history = schedule::run(seed);
        let report = schedule::check(&history);
        if let Some(violation) = report.violations.iter().find(|v| v.clause == 1) {
            found = Some((seed, violation.what.clone()));
            break;
        }
    }
    ha_core::testing::mutant::disable_self_fencing(false);
    let (seed, what) = found.unwrap_or_else(|| {
        panic!("300 schedules without self-fencing and the checker saw nothing: it proves nothing")
    });
    eprintln!("mutant caught at seed {seed}: {what}");
}
