//! Thousands of seeded fault schedules on the memory backend in virtual time, each
//! checked by the history checker: never two leaders acting at once, tokens in order,
//! a leader again soon after the faults heal. `HA_FAULT_RUNS=N` / `HA_FAULT_SEEDS=a,b`
//! pick the seeds; a failure prints the seed, the replay command and the timeline.

mod schedule;

use ha_core::testing::history::fault_seeds;

#[test]
fn fault_schedules_never_show_two_leaders() {
    let seeds = fault_seeds(2000);
    let started = std::time::Instant::now();
    let (mut leaderships, mut actions, mut faults) = (0, 0, 0);
    for &seed in &seeds {
        let history = schedule::run(seed);
        let report = history.assert_ok(
            Some(schedule::LIVENESS),
            seed,
            &schedule::replay(seed, "fault_schedules"),
        );
        leaderships += report.leaderships;
        actions += report.actions;
        faults += report.faults;
    }
    eprintln!(
        "memory: {} schedules, {faults} faults, {leaderships} leaderships, {actions} actions, 0 violations, in {:?}",
        seeds.len(),
        started.elapsed()
    );
    assert!(
        leaderships > seeds.len(),
        "the schedules elected almost nobody"
    );
}

#[test]
fn the_same_seed_gives_the_same_history() {
    for seed in [3, 17] {
        let first = schedule::run(seed).timeline();
        let second = schedule::run(seed).timeline();
        assert_eq!(first, second, "seed {seed} is not reproducible");
    }
}
