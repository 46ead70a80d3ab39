//! A GPU's turns: tasks that wait for a GPU with more tasks than it runs
//! at once are served by priority (the owner's share for the submitter's
//! institution, then that institution's credit balance), then in order of
//! arrival.

use std::sync::{Arc, Mutex};

/// One task at a time on a GPU; the tasks waiting go in order of the
/// owner's share for their submitting institution, then of that
/// institution's balance (GPU time given minus taken, from the alliance's
/// credits), then of arrival. Members who give are served before members
/// who only take.
#[derive(Default)]
pub(super) struct Turns {
    state: Mutex<TurnState>,
}

#[derive(Default)]
pub(super) struct TurnState {
    busy: bool,
    arrivals: u64,
    /// (priority reversed, arrival) → the waiter to wake.
    waiting: std::collections::BTreeMap<
        (std::cmp::Reverse<Priority>, u64),
        tokio::sync::oneshot::Sender<()>,
    >,
}

/// A waiting task's claim: the owner's share for its institution, then the
/// institution's balance in GPU milliseconds.
pub(super) type Priority = (u32, i64);

/// The GPU, while held.
pub(super) struct Turn(Arc<Turns>);

impl Turns {
    /// The GPU if nobody holds it now.
    pub(super) fn try_take(self: &Arc<Self>) -> Option<Turn> {
        let mut s = self.state.lock().ok()?;
        if s.busy {
            return None;
        }
        s.busy = true;
        Some(Turn(Arc::clone(self)))
    }

    /// Waits for the GPU; `priority` orders the waiters, highest first.
    pub(super) async fn wait(self: &Arc<Self>, priority: Priority) -> Turn {
        let rx = {
            let Ok(mut s) = self.state.lock() else {
                return Turn(Arc::clone(self));
            };
            if !s.busy {
                s.busy = true;
                return Turn(Arc::clone(self));
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            s.arrivals += 1;
            let at = s.arrivals;
            s.waiting.insert((std::cmp::Reverse(priority), at), tx);
            rx
        };
        // The GPU is handed over busy; a dropped gate lets the next one in.
        let _ = rx.await;
        Turn(Arc::clone(self))
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let Ok(mut s) = self.0.state.lock() else {
            return;
        };
        while let Some((_, next)) = s.waiting.pop_first() {
            if next.send(()).is_ok() {
                return;
            }
        }
        s.busy = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    #[tokio::test]
    async fn the_gpu_goes_to_the_largest_share_then_balance_then_the_earliest() {
        let turns = Arc::new(Turns::default());
        let held = turns.wait((1, 0)).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for (name, priority) in [
            ("taker", (1, -5)),
            ("giver", (1, 10)),
            ("new", (1, 0)),
            ("new2", (1, 0)),
            ("shunned", (0, 50)),
        ] {
            let (turns, order) = (Arc::clone(&turns), Arc::clone(&order));
            waiters.push(tokio::spawn(async move {
                let _turn = turns.wait(priority).await;
                order.lock().unwrap().push(name);
            }));
            // Arrival order is the order of the loop.
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // One waiter gives up: the GPU passes over it.
        let (quitter, stop) = {
            let turns = Arc::clone(&turns);
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            (
                tokio::spawn(async move {
                    tokio::select! {
                        _ = turns.wait((9, 0)) => {}
                        _ = rx => {}
                    }
                }),
                tx,
            )
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        let _ = stop.send(());
        quitter.await.unwrap();
        drop(held);
        for w in waiters {
            w.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            ["giver", "new", "new2", "taker", "shunned"]
        );
        // Free again: the next comer gets it at once.
        let _again = tokio::time::timeout(Duration::from_secs(1), turns.wait((1, 0)))
            .await
            .unwrap();
    }
}
