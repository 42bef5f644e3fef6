//! Thousands of seeded fault schedules on the memory backend in virtual time, each
//! checked by the history checker: never two leaders acting at once, tokens in order,
//! a leader again soon after the faults heal. `HA_FAULT_RUNS=N` / `HA_FAULT_SEEDS=a,b`
//! pick the seeds; a failure prints the seed, the replay command and the timeline.

mod schedule;

use ha_core::testing::history::{fault_seeds, Totals};

#[test]
fn fault_schedules_never_show_two_leaders() {
    let seeds = fault_seeds(2000);
    let started = std::time::Instant::now();
    let mut totals = Totals::default();
    for &seed in &seeds {
        let history = schedule::run(seed);
        totals.add(&history.assert_ok(
            Some(schedule::LIVENESS),
            seed,
            &schedule::replay(seed, "fault_schedules"),
        ));
    }
    eprintln!("memory: {totals}, in {:?}", started.elapsed());
    assert!(
        totals.leaderships > seeds.len(),
        "the schedules elected almost nobody"
    );
    assert!(
        totals.writes >= seeds.len(),
        "the schedules made almost no guarded writes: {totals}"
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
