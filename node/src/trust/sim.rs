//! A model of many workers answering many tasks, some of them saboteurs,
//! to measure what verification costs and which wrong answers it lets
//! through: plain two-way voting against the adaptive policy the
//! scheduler applies to `redundancy = "auto"` jobs.
//!
//! The adaptive side uses the scheduler's own rules: [`Record`] decides
//! trust and spot-check probability; a result accepted alone earns
//! nothing, a confirmed one counts for its worker, an outvoted one
//! against it; a worker caught lying has every result it ran alone
//! checked again; second opinions come from trusted workers where there
//! are any. What the model leaves out is the network: tasks go to
//! workers drawn at random, one after another, and institutions are not
//! modelled (each worker is its own). Saboteurs collude: every lie is the
//! same wrong answer, the worst case for voting.

use crate::trust::reputation::{Event, Record};
use alliance_protocol::Timestamp;

/// How results are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Every task on two workers; on disagreement, more until two agree.
    Voting,
    /// Alone on trusted workers, with spot checks; replicated otherwise.
    Adaptive,
}

/// One run of the model.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    pub workers: usize,
    /// Share of the workers that are saboteurs.
    pub saboteurs: f64,
    /// How often a saboteur lies.
    pub lie_rate: f64,
    pub tasks: usize,
    /// Tasks before measuring starts (records being built).
    pub warmup: usize,
    pub seed: u64,
}

/// What a run measured, over the tasks after the warm-up.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outcome {
    pub tasks: u64,
    /// Tasks whose accepted answer is wrong at the end of the run.
    pub wrong: u64,
    /// Task executions, checks and re-checks included.
    pub executions: u64,
}

impl Outcome {
    pub fn error_rate(&self) -> f64 {
        ratio(self.wrong, self.tasks)
    }

    /// GPU time against running every task once.
    pub fn overhead(&self) -> f64 {
        ratio(self.executions, self.tasks)
    }
}

#[allow(clippy::cast_precision_loss)]
fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / b.max(1) as f64
}

/// splitmix64: small, fast and good enough for a model.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    #[allow(clippy::cast_precision_loss)]
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        #[allow(clippy::cast_possible_truncation)]
        let i = (self.next() % n as u64) as usize;
        i
    }
}

struct Model {
    p: Params,
    rng: Rng,
    saboteur: Vec<bool>,
    records: Vec<Record>,
    /// Per worker: tasks it ran alone since it was last caught.
    alone: Vec<Vec<usize>>,
    /// Per task: the accepted answer is right.
    right: Vec<bool>,
    executions: u64,
    now: Timestamp,
}

impl Model {
    /// Worker `w`'s answer: right, or the saboteurs' shared wrong one.
    fn answer(&mut self, w: usize) -> bool {
        !(self.saboteur[w] && self.rng.unit() < self.p.lie_rate)
    }

    fn count(&mut self, task: usize) {
        if task >= self.p.warmup {
            self.executions += 1;
        }
    }

    /// Replicas until one answer has two votes; starts from `first`
    /// (worker, answer) when given. Returns the accepted answer and the
    /// replicas (worker, answer).
    fn vote(
        &mut self,
        policy: Policy,
        task: usize,
        first: Option<(usize, bool)>,
    ) -> (bool, Vec<(usize, bool)>) {
        let mut replicas: Vec<(usize, bool)> = first.into_iter().collect();
        loop {
            let (yes, no) = replicas.iter().fold(
                (0, 0),
                |(y, n), r| if r.1 { (y + 1, n) } else { (y, n + 1) },
            );
            if yes >= 2 || no >= 2 {
                return (yes >= 2, replicas);
            }
            if replicas.len() >= self.p.workers {
                return (yes >= no, replicas);
            }
            // The adaptive policy checks with trusted workers where it can.
            let trusted: Vec<usize> = if policy == Policy::Adaptive {
                (0..self.p.workers)
                    .filter(|&w| self.records[w].trusted() && !replicas.iter().any(|r| r.0 == w))
                    .collect()
            } else {
                Vec::new()
            };
            let w = if trusted.is_empty() {
                loop {
                    let w = self.rng.below(self.p.workers);
                    if !replicas.iter().any(|r| r.0 == w) {
                        break w;
                    }
                }
            } else {
                trusted[self.rng.below(trusted.len())]
            };
            let a = self.answer(w);
            self.count(task);
            replicas.push((w, a));
        }
    }

    /// Counts a vote in the records; re-checks what a caught worker ran
    /// alone.
    fn judge(&mut self, accepted: bool, replicas: &[(usize, bool)]) {
        for &(w, a) in replicas {
            if a == accepted {
                self.records[w].apply(Event::Agreed, self.now);
            } else {
                self.records[w].apply(Event::Wrong, self.now);
                let lone = std::mem::take(&mut self.alone[w]);
                for task in lone {
                    // The caught worker's answer stands as one replica;
                    // others decide.
                    let first = (w, self.right[task]);
                    let (ok, reps) = self.vote(Policy::Adaptive, task, Some(first));
                    self.right[task] = ok;
                    self.judge(ok, &reps);
                }
            }
        }
    }

    fn task(&mut self, policy: Policy, task: usize) {
        match policy {
            Policy::Voting => {
                let (ok, _) = self.vote(policy, task, None);
                self.right[task] = ok;
            }
            Policy::Adaptive => {
                let w = self.rng.below(self.p.workers);
                let a = self.answer(w);
                self.count(task);
                let record = &self.records[w];
                if record.trusted() && self.rng.unit() >= record.spot_check() {
                    self.right[task] = a;
                    self.alone[w].push(task);
                    return;
                }
                let (ok, reps) = self.vote(policy, task, Some((w, a)));
                self.right[task] = ok;
                self.judge(ok, &reps);
            }
        }
    }
}

/// Runs the model.
pub fn run(policy: Policy, p: Params) -> Outcome {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let saboteurs = (p.saboteurs * p.workers as f64).round() as usize;
    let mut m = Model {
        p,
        rng: Rng(p.seed),
        saboteur: (0..p.workers).map(|w| w < saboteurs).collect(),
        records: vec![Record::default(); p.workers],
        alone: vec![Vec::new(); p.workers],
        right: vec![true; p.tasks],
        executions: 0,
        now: Timestamp::from_secs(0),
    };
    for task in 0..p.tasks {
        m.task(policy, task);
    }
    let measured = p.tasks.saturating_sub(p.warmup);
    Outcome {
        tasks: measured as u64,
        wrong: m.right[p.warmup.min(p.tasks)..]
            .iter()
            .filter(|r| !**r)
            .count() as u64,
        executions: m.executions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(saboteurs: f64) -> Params {
        Params {
            workers: 100,
            saboteurs,
            lie_rate: 0.5,
            tasks: 60_000,
            warmup: 20_000,
            seed: 7,
        }
    }

    #[test]
    fn honest_workers_cost_little_once_trusted() {
        let v = run(Policy::Voting, params(0.0));
        let a = run(Policy::Adaptive, params(0.0));
        assert_eq!((v.wrong, a.wrong), (0, 0));
        assert!((v.overhead() - 2.0).abs() < 1e-9, "{}", v.overhead());
        assert!(a.overhead() < 1.2, "{}", a.overhead());
    }

    #[test]
    fn adaptive_replication_beats_voting_against_saboteurs() {
        let v = run(Policy::Voting, params(0.1));
        let a = run(Policy::Adaptive, params(0.1));
        // Colluding saboteurs win a two-way vote when both lie:
        // about 0.1 × 0.1 × 0.5 × 0.5 of tasks.
        assert!(v.error_rate() > 1e-3, "{}", v.error_rate());
        assert!(a.error_rate() < v.error_rate() / 10.0, "{a:?} vs {v:?}");
        assert!(a.overhead() < 1.3, "{a:?}");
    }
}
